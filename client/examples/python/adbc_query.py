#!/usr/bin/env python3
"""Run one SQL statement on a Volley cluster through Arrow Flight SQL with ADBC.

    pip install adbc-driver-flightsql adbc-driver-manager pyarrow
    python3 adbc_query.py --url grpc://127.0.0.1:50050 --token "$VOLLEY_AUTH_TOKEN" \
        --sql "SELECT l_returnflag, count(*) FROM lineitem GROUP BY 1"

Tables come from the scheduler's shared catalog (`volley scheduler --table NAME=PATH` or
`--catalog FILE`). The result is printed (as a pandas DataFrame when pandas is installed) and,
with `--out FILE`, written as an Arrow IPC file.
"""

import argparse
import sys

import adbc_driver_flightsql.dbapi as flight_sql
import pyarrow as pa


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="grpc://HOST:PORT (grpc+tls:// with TLS)")
    parser.add_argument("--token", default="", help="the cluster's client token")
    parser.add_argument("--sql", help="the statement")
    parser.add_argument("--sql-file", help="a file holding the statement")
    parser.add_argument("--out", help="write the result to this Arrow IPC file")
    args = parser.parse_args()
    sql = args.sql if args.sql else open(args.sql_file, encoding="utf-8").read()

    db_kwargs = {}
    if args.token:
        db_kwargs["adbc.flight.sql.authorization_header"] = f"Bearer {args.token}"
    with flight_sql.connect(args.url, db_kwargs=db_kwargs, autocommit=True) as conn:
        with conn.cursor() as cursor:
            cursor.execute(sql)
            table: pa.Table = cursor.fetch_arrow_table()

    if args.out:
        with pa.OSFile(args.out, "wb") as sink:
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
    try:
        print(table.to_pandas())
    except ImportError:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
