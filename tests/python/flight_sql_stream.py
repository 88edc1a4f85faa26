#!/usr/bin/env python3
"""Stream one query's result through the ADBC Flight SQL driver a batch at a time (nothing
kept) and print {"rows", "bytes", "seconds"} as JSON (tests/benches/flight_sql.rs).

    flight_sql_stream.py URL TOKEN SQL
"""

import json
import sys
import time

import adbc_driver_flightsql.dbapi as flight_sql


def main() -> int:
    url, token, sql = sys.argv[1:4]
    db_kwargs = {"adbc.flight.sql.authorization_header": f"Bearer {token}"} if token else {}
    started = time.monotonic()
    rows = 0
    nbytes = 0
    with flight_sql.connect(url, db_kwargs=db_kwargs, autocommit=True) as conn:
        with conn.cursor() as cursor:
            cursor.execute(sql)
            reader = cursor.fetch_record_batch()
            for batch in reader:
                rows += batch.num_rows
                nbytes += batch.get_total_buffer_size()
    print(json.dumps({"rows": rows, "bytes": nbytes, "seconds": time.monotonic() - started}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
