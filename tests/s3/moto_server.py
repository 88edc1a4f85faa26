"""moto's S3 server for Volley's tests, with one fix: moto 5.2.1 checks a request's signature
against its query string *decoded* (werkzeug's request.url turns `prefix=a%2Fb` into
`prefix=a/b`), so with IAM authentication on, every signed listing of a prefix holding `/`
fails with SignatureDoesNotMatch (boto3's too). Here the check sees the query as it arrived
(QUERY_STRING). Everything else is moto's own server: `python3 moto_server.py -H HOST -p PORT`.
"""
import sys
from urllib.parse import urlparse, urlunparse

from moto.core.authorization import ActionAuthenticatorMixin
from moto.core.responses import BaseResponse
from moto.server import main

_setup_class = BaseResponse.setup_class
_authenticate = ActionAuthenticatorMixin._authenticate_and_authorize_action


def setup_class(self, request, full_url, headers, use_raw_body=False):
    environ = getattr(request, "environ", None)
    self._raw_query = environ.get("QUERY_STRING") if environ else None
    return _setup_class(self, request, full_url, headers, use_raw_body)


def authenticate(self, iam_request_cls, resource="*"):
    raw = getattr(self, "_raw_query", None)
    if raw is None:
        return _authenticate(self, iam_request_cls, resource)
    decoded = self.uri
    self.uri = urlunparse(urlparse(decoded)._replace(query=raw))
    try:
        return _authenticate(self, iam_request_cls, resource)
    finally:
        self.uri = decoded


BaseResponse.setup_class = setup_class
ActionAuthenticatorMixin._authenticate_and_authorize_action = authenticate

if __name__ == "__main__":
    main(sys.argv[1:])
