"""The oracle: Shardwire's answers compared with one PostgreSQL server's (docs/testing.md).

A package, so that its modules and its conftest do not shadow the plain `conftest` module
that tests/integration imports its constants from.
"""
