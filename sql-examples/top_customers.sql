-- Top 5 customers by revenue (TPC-H tables).
SELECT c_name, sum(l_extendedprice * (1 - l_discount)) AS revenue
FROM customer
JOIN orders ON o_custkey = c_custkey
JOIN lineitem ON l_orderkey = o_orderkey
GROUP BY c_name
ORDER BY revenue DESC, c_name
LIMIT 5;
