"""plan_merge: what every shard runs, and what is refused."""

from __future__ import annotations

import pytest

from shardwire.merge import MergeRefused, Mode

from .conftest import plan


@pytest.mark.parametrize("sql", [
    "SELECT * FROM orders",
    "SELECT id, amount FROM orders WHERE status = $1 ORDER BY amount DESC, id",
    "SELECT id FROM orders ORDER BY id LIMIT 10",
    "SELECT count(*), sum(amount), min(created), max(status) FROM orders",
    "SELECT status, count(*) FROM orders GROUP BY status",
    "SELECT DISTINCT status FROM orders",
    "/* comment */ SELECT id FROM orders WHERE id IN ($1,$2) ORDER BY id;",
    "SELECT customer_id, string_agg(note, ',') FROM orders GROUP BY customer_id",
])
def test_unchanged_text_when_nothing_needs_rewriting(sql: str) -> None:
    assert plan(sql).shard_sql == sql


@pytest.mark.parametrize(("sql", "shard_sql", "mode", "params"), [
    ("SELECT id FROM orders ORDER BY amount LIMIT 10 OFFSET 5",
     "SELECT id, amount AS __sw_1 FROM orders ORDER BY amount LIMIT 15 ", Mode.SORT, ()),
    ("SELECT id FROM orders ORDER BY id LIMIT $1 OFFSET $2",
     "SELECT id FROM orders ORDER BY id LIMIT LEAST(($1::bigint)::numeric + "
     "COALESCE(($2::bigint)::numeric, 0), 9223372036854775807) ", Mode.SORT, (1, 2)),
    ("SELECT id FROM orders OFFSET $1",
     "SELECT id FROM orders OFFSET 0 * COALESCE($1::bigint, 0) ", Mode.UNION, (1,)),
    ("SELECT id FROM orders LIMIT 5 OFFSET 2", "SELECT id FROM orders LIMIT 7 ", Mode.UNION, ()),
    ("SELECT id FROM orders ORDER BY id OFFSET 2 FETCH FIRST 3 ROWS WITH TIES",
     "SELECT id FROM orders ORDER BY id FETCH FIRST (5) ROWS WITH TIES ", Mode.SORT, ()),
    ("SELECT status, avg(amount) FROM orders GROUP BY status",
     "SELECT status, avg(amount), SUM(amount) AS __sw_1, COUNT(amount) AS __sw_2 FROM orders "
     "GROUP BY status", Mode.AGGREGATE, ()),
    ("SELECT count(*) FROM orders GROUP BY status HAVING sum(qty) > 10 ORDER BY 1 DESC LIMIT 3",
     "SELECT count(*), status AS __sw_1, SUM(qty) AS __sw_2 FROM orders GROUP BY status "
     "HAVING TRUE ", Mode.AGGREGATE, ()),
    ("SELECT status, count(*) FROM orders GROUP BY 1 LIMIT $1",
     "SELECT status, count(*) FROM orders GROUP BY 1 OFFSET 0 * COALESCE($1::bigint, 0) ",
     Mode.AGGREGATE, (1,)),
    ("SELECT sum(amount) / count(*) AS ratio FROM orders",
     'SELECT CASE WHEN FALSE THEN SUM(amount) / COUNT(*) END AS "ratio", SUM(amount) AS __sw_1, '
     "COUNT(*) AS __sw_2 FROM orders", Mode.AGGREGATE, ()),
    ("SELECT sum(amount)::numeric(10,2) FROM orders",
     'SELECT CAST(CASE WHEN FALSE THEN SUM(amount) END AS DECIMAL(10, 2)) AS "sum", '
     "SUM(amount) AS __sw_1 FROM orders", Mode.AGGREGATE, ()),
    ("SELECT DISTINCT ON (status) id FROM orders ORDER BY status, created DESC",
     "SELECT DISTINCT ON (status) id, status AS __sw_1, created AS __sw_2 FROM orders "
     "ORDER BY status, created DESC", Mode.SORT, ()),
    ("SELECT DISTINCT count(*) FROM orders GROUP BY status",
     "SELECT  count(*), status AS __sw_1 FROM orders GROUP BY status", Mode.AGGREGATE, ()),
])
def test_rewrites(sql: str, shard_sql: str, mode: Mode, params: tuple[int, ...]) -> None:
    p = plan(sql)
    assert p.shard_sql == shard_sql
    assert p.mode is mode
    assert p.params_needed == params


def test_groups_with_the_sharding_key_stay_on_their_shard() -> None:
    # Every group lives on one shard: no re-aggregation, any aggregate, HAVING on the shards.
    p = plan("SELECT o.customer_id, string_agg(note, ','), count(DISTINCT status) FROM orders o "
             "GROUP BY 1 HAVING count(*) > 2 ORDER BY count(*) DESC LIMIT 3 OFFSET 1")
    assert p.mode is Mode.SORT
    assert p.shard_sql == (
        "SELECT o.customer_id, string_agg(note, ','), count(DISTINCT status), "
        "COUNT(*) AS __sw_1 FROM orders o GROUP BY 1 HAVING count(*) > 2 ORDER BY count(*) DESC "
        "LIMIT 4 ")


def test_count_distinct_of_the_sharding_key_sums() -> None:
    p = plan("SELECT count(DISTINCT customer_id) FROM orders")
    assert p.mode is Mode.AGGREGATE
    assert p.shard_sql == "SELECT count(DISTINCT customer_id) FROM orders"


def test_distinct_with_the_sharding_key_needs_no_dedup() -> None:
    p = plan("SELECT DISTINCT customer_id, status FROM orders")
    assert not p.plan.distinct
    assert plan("SELECT DISTINCT status FROM orders").plan.distinct


def test_left_joined_key_does_not_count_as_key() -> None:
    p = plan("SELECT i.customer_id, count(*) FROM countries c LEFT JOIN items i ON true "
             "GROUP BY i.customer_id")
    assert p.mode is Mode.AGGREGATE


def test_order_by_output_alias_and_position() -> None:
    p = plan("SELECT id AS x, amount a FROM orders ORDER BY a, 1 DESC")
    assert [(k.col, k.desc) for k in p.plan.sort] == [(1, False), (0, True)]
    assert p.shard_sql == "SELECT id AS x, amount a FROM orders ORDER BY a, 1 DESC"


def test_order_by_collate_c() -> None:
    p = plan('SELECT id FROM orders ORDER BY status COLLATE "C" DESC')
    assert (p.plan.sort[0].collation or "").lower() == "c"
    assert p.plan.sort[0].nulls_first  # DESC puts NULLs first by default


@pytest.mark.parametrize(("sql", "fragment"), [
    ("SELECT a FROM orders UNION SELECT a FROM items", "set operation"),
    ("SELECT row_number() OVER () FROM orders", "window functions"),
    ("SELECT * FROM orders WHERE amount > (SELECT avg(amount) FROM orders)", "subquery or CTE"),
    ("WITH x AS (SELECT status, count(*) FROM orders GROUP BY status) SELECT * FROM x",
     "subquery or CTE"),
    ("SELECT * FROM orders WHERE id IN (SELECT id FROM items LIMIT 1)", "LIMIT/OFFSET"),
    ("SELECT * FROM (SELECT DISTINCT status FROM orders) s", "DISTINCT"),
    ("SELECT * FROM orders WHERE x IN (SELECT a FROM items UNION SELECT b FROM items)",
     "set operation"),
    ("SELECT * FROM orders FOR UPDATE", "FOR UPDATE"),
    ("SELECT * INTO t2 FROM orders", "SELECT INTO"),
    ("UPDATE orders SET a = 1", "only SELECT"),
    ("SELECT * FROM orders ORDER BY random()", "volatile"),
    ("SELECT count(DISTINCT status) FROM orders", "counted on several shards"),
    ("SELECT string_agg(status, ',') FROM orders", "cannot be merged"),
    ("SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY amount) FROM orders", "cannot be merged"),
    ("SELECT stddev(amount) FROM orders GROUP BY status", "cannot be merged"),
    ("SELECT status FROM orders GROUP BY status HAVING sum(amount) > $1", "parameter"),
    ("SELECT round(avg(amount), 2) FROM orders", "cannot evaluate"),
    ("SELECT status, count(*) FROM orders GROUP BY ROLLUP (status)", "ROLLUP"),
    ("SELECT * FROM orders ORDER BY $1", "parameter"),
    ("SELECT id FROM orders LIMIT (SELECT 1)", "LIMIT/OFFSET"),
    ("SELECT id FROM orders ORDER\n /* x */ BY id", "cannot parse"),
])
def test_refusals(sql: str, fragment: str) -> None:
    with pytest.raises(MergeRefused) as e:
        plan(sql)
    assert e.value.sqlstate == "0A000"
    assert fragment in e.value.message
    assert e.value.hint


def test_reference_tables_in_subqueries_are_fine() -> None:
    p = plan("SELECT * FROM orders WHERE country IN (SELECT code FROM countries GROUP BY code)")
    assert p.mode is Mode.UNION


def test_plan_is_deterministic() -> None:
    sql = "SELECT status, avg(amount) FROM orders GROUP BY status HAVING count(*) > 1"
    assert plan(sql) == plan(sql)


def test_group_by_helper_repeats_the_expression_as_written() -> None:
    # sqlglot would print DATE_TRUNC('MONTH', ...): another constant, so PostgreSQL would
    # refuse the helper column (42803); the oracle found it.
    assert plan("SELECT count(*) FROM orders GROUP BY date_trunc('month', created), "
                "substr(status, 1, 2)").shard_sql == (
        "SELECT count(*), date_trunc('month', created) AS __sw_1, substr(status, 1, 2) AS "
        "__sw_2 FROM orders GROUP BY date_trunc('month', created), substr(status, 1, 2)")


def test_is_distinct_from_is_no_from_clause() -> None:
    sql = "SELECT count(*) FROM orders WHERE status IS NOT DISTINCT FROM 'paid'"
    assert plan(sql).shard_sql == sql
    sql = "SELECT id FROM orders WHERE status IS DISTINCT FROM $1 ORDER BY id"
    assert plan(sql).shard_sql == sql
