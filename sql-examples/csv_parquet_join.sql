-- Join a CSV file (sales targets per region) with Parquet tables: order revenue per region
-- against its target.
CREATE EXTERNAL TABLE region_targets STORED AS CSV LOCATION 'sql-examples/region_targets.csv'
OPTIONS ('format.has_header' 'true');

SELECT r.r_name, sum(o.o_totalprice) AS revenue, t.target,
       sum(o.o_totalprice) >= t.target AS met
FROM orders o
JOIN customer c ON c.c_custkey = o.o_custkey
JOIN nation n ON n.n_nationkey = c.c_nationkey
JOIN region r ON r.r_regionkey = n.n_regionkey
JOIN region_targets t ON t.r_name = r.r_name
GROUP BY r.r_name, t.target
ORDER BY r.r_name;
