# Operator and developer entry points (see README.md).
.PHONY: setup run test bench chaos fuzz-build lint

setup:        ## install MariaDB, RabbitMQ, libzmq if missing, start MariaDB and RabbitMQ, build feedd
	bash .ci/setup
	cargo build --release

run: setup    ## serve in the foreground on conf/feed.ini
	./target/release/feedd --conf conf/feed.ini

test:         ## unit + integration tests, then a quick benchmark smoke run (needs `make setup` once)
	cargo test --quiet --locked -- --test-threads 4
	cargo bench --locked --bench ingest -- --quick
	cargo bench --locked --bench amqp -- --quick
	cargo bench --locked --bench chaos -- --secs 15
	cargo build --locked --manifest-path tests/fuzz/Cargo.toml

bench:        ## the ingest and AMQP benchmarks with their baselines
	cargo bench --bench ingest
	cargo bench --bench amqp

chaos:        ## 10 minutes of random faults under load; prints the invariant counts
	cargo bench --bench chaos -- --secs 600

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
