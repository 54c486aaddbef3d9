# Operator and developer entry points (see README.md).
.PHONY: setup test-setup run test bench chaos fuzz-build lint deb rules

CONF ?= conf/feed.ini

setup:        ## what serving needs: MariaDB (started, `test` database), libzmq; RabbitMQ only if $(CONF) sets [amqp] url; builds the daemon alone
	bash .ci/setup-serve $(CONF)
	# The daemon only: the load generator's crates (feature `load-generator`) are not built.
	cargo build --release --locked --no-default-features --bin feedd

run: setup    ## serve in the foreground on $(CONF)
	./target/release/feedd --conf $(CONF)

test-setup:   ## everything the tests need (.ci/setup: the serving setup with RabbitMQ, Galera, PHP, Python, Prometheus, cargo-deb …)
	bash .ci/setup

test: test-setup lint rules ## test packages, lint, the alert rules' tests, unit + integration tests, then a quick benchmark smoke run
	FEEDD_TEST_PACKAGE=1 cargo test --quiet --locked -- --test-threads 4 --include-ignored
	cargo bench --locked --bench ingest -- --quick
	cargo bench --locked --bench amqp -- --quick
	cargo bench --locked --bench chaos -- --secs 15
	cargo bench --locked --bench cluster -- --quick
	cargo build --locked --manifest-path tests/fuzz/Cargo.toml

deb:          ## the Debian package, target/debian/feedd_*.deb (needs `cargo install cargo-deb`)
	cargo deb --locked

bench:        ## the ingest and AMQP benchmarks with their baselines (SVG charts beside the CSV/JSON in target/bench/), then Galera and TLS costs
	cargo bench --bench ingest
	cargo bench --bench amqp
	cargo bench --bench cluster

chaos:        ## 10 minutes of random faults under load, RabbitMQ a 3-node cluster (node kills); prints the invariant counts
	cargo bench --bench chaos -- --secs 600 --cluster

rules:        ## the Prometheus rules: promtool's syntax check and their unit tests (series in, alerts out)
	promtool check rules conf/prometheus/feedd-rules.yml
	promtool test rules conf/prometheus/feedd-rules.test.yml

lint:         ## rustfmt and clippy with warnings as errors (CI runs it through `make test`)
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	# src/ (library and binaries): no function over 80 lines (clippy.toml); tests and benches may.
	cargo clippy --lib --bins -- -D warnings -W clippy::too_many_lines
