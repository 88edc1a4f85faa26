-- Revenue per month of 1995 with a running total (window function over the monthly sums).
SELECT month, revenue, sum(revenue) OVER (ORDER BY month) AS running_total
FROM (
    SELECT date_trunc('month', o_orderdate) AS month, sum(o_totalprice) AS revenue
    FROM orders
    WHERE o_orderdate >= DATE '1995-01-01' AND o_orderdate < DATE '1996-01-01'
    GROUP BY date_trunc('month', o_orderdate)
) monthly
ORDER BY month;
