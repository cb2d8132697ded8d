import pytest

# Helper modules that test files import directly: rewrite their asserts as pytest does for
# plugins (this package is imported before any of them).
pytest.register_assert_rewrite(
    "tests.cloud_servers", "tests.etcd_server", "tests.servers", "tests.fake_backend"
)
