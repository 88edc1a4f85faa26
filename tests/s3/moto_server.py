"""moto's S3 server for Volley's tests, with one fix: moto 5.2.1 checks a request's signature
against the URL as werkzeug re-renders it (`request.url`: `prefix=a%2Fb` in a query becomes
`prefix=a/b`, while `%3D` in a path stays), not as the client signed it, so with IAM
authentication on, every signed listing of a prefix holding `/` and every object whose key
holds `=` (Hive partition folders) fail with SignatureDoesNotMatch (boto3's too). Here the
check sees the path and query exactly as they arrived (RAW_URI). Everything else is moto's own
server: `python3 moto_server.py -H HOST -p PORT`.
"""
import sys
from urllib.parse import urlparse, urlunparse

from moto.core.authorization import ActionAuthenticatorMixin
from moto.core.responses import BaseResponse
from moto.server import main

_setup_class = BaseResponse.setup_class
_authenticate = ActionAuthenticatorMixin._authenticate_and_authorize_action


def setup_class(self, request, full_url, headers, use_raw_body=False):
    environ = getattr(request, "environ", None) or {}
    self._raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    return _setup_class(self, request, full_url, headers, use_raw_body)


def authenticate(self, iam_request_cls, resource="*"):
    raw = getattr(self, "_raw_uri", None)
    if not raw:
        return _authenticate(self, iam_request_cls, resource)
    rendered = self.uri
    raw = urlparse(raw)
    self.uri = urlunparse(urlparse(rendered)._replace(path=raw.path, query=raw.query))
    try:
        return _authenticate(self, iam_request_cls, resource)
    finally:
        self.uri = rendered


BaseResponse.setup_class = setup_class
ActionAuthenticatorMixin._authenticate_and_authorize_action = authenticate

if __name__ == "__main__":
    main(sys.argv[1:])
