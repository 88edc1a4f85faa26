#!/usr/bin/env python3
"""What tests/tests/cases/flight_sql.rs asks of a Volley scheduler through the real ADBC Flight
SQL driver. Prints one JSON object: each check's answer, for the Rust test to compare with its
oracles.

    flight_sql_checks.py URL TOKEN HTTP_URL CLUSTER_TOKEN
"""

import json
import sys
import threading
import time
import urllib.request

import adbc_driver_flightsql.dbapi as flight_sql
import adbc_driver_manager
import pyarrow as pa

PREPARED = (
    "SELECT count(*) AS n, sum(l_quantity) AS quantity FROM lineitem "
    "WHERE l_quantity < $1 AND l_returnflag = $2"
)
LONG = (
    "SELECT count(*) FROM lineitem a JOIN lineitem b ON a.l_suppkey = b.l_suppkey "
    "WHERE a.l_comment < b.l_comment"
)


def connect(url, **db_kwargs):
    return flight_sql.connect(url, db_kwargs=db_kwargs, autocommit=True)


def bearer(url, token):
    return connect(url, **{"adbc.flight.sql.authorization_header": f"Bearer {token}"})


def rows(table: pa.Table):
    return [list(map(str, r.values())) for r in table.to_pylist()]


def running_tasks(http_url, cluster_token):
    request = urllib.request.Request(
        f"{http_url}/metrics", headers={"Authorization": f"Bearer {cluster_token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("volley_running_tasks "):
                return float(line.split()[1])
    raise RuntimeError("no volley_running_tasks in /metrics")


def main() -> int:
    url, token, http_url, cluster_token = sys.argv[1:5]
    out = {}
    with bearer(url, token) as conn:
        with conn.cursor() as cursor:
            # One prepared statement, two bound parameters, executed with two sets of values.
            out["prepared"] = []
            for params in [(10, "R"), (30, "A")]:
                cursor.execute(PREPARED, parameters=params)
                out["prepared"].append(rows(cursor.fetch_arrow_table()))

        objects = conn.adbc_get_objects(depth="all").read_all().to_pylist()
        tables = {}
        for catalog in objects:
            for schema in catalog["catalog_db_schemas"] or []:
                for table in schema["db_schema_tables"] or []:
                    columns = table["table_columns"] or []
                    tables[table["table_name"]] = {
                        "catalog": catalog["catalog_name"],
                        "schema": schema["db_schema_name"],
                        "type": table["table_type"],
                        "columns": [c["column_name"] for c in columns],
                        "xdbc_types": [c["xdbc_data_type"] for c in columns],
                        "type_names": [c["xdbc_type_name"] for c in columns],
                    }
        out["objects"] = tables
        schema = conn.adbc_get_table_schema("nation")
        out["nation_schema"] = [[f.name, str(f.type)] for f in schema]
        out["table_types"] = sorted(conn.adbc_get_table_types())

        # A long query cancelled through ADBC: the error, and how long the cancel took.
        with conn.cursor() as cursor:
            error = {}

            def run():
                try:
                    cursor.execute(LONG)
                    cursor.fetch_arrow_table()
                    error["message"] = "finished"
                except Exception as e:  # the driver's cancellation error
                    error["message"] = f"{type(e).__name__}: {e}"

            thread = threading.Thread(target=run)
            thread.start()
            deadline = time.monotonic() + 30
            while running_tasks(http_url, cluster_token) == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1)
            started = time.monotonic()
            cursor.adbc_cancel()
            thread.join(30)
            while running_tasks(http_url, cluster_token) > 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            out["cancel"] = {
                "error": error.get("message", "still running"),
                "tasks_stopped_after": time.monotonic() - started,
            }

    # HTTP Basic: any user name, the token as password.
    with connect(url, username="analyst", password=token) as conn:
        with conn.cursor() as cursor:
            cursor.execute("SELECT count(*) AS n FROM nation")
            out["basic"] = rows(cursor.fetch_arrow_table())

    # A wrong token is refused.
    try:
        with bearer(url, token + "-wrong") as conn:
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1")
                cursor.fetch_arrow_table()
        out["wrong_token"] = "accepted"
    except adbc_driver_manager.Error as e:
        out["wrong_token"] = f"{type(e).__name__}: {e}"

    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
