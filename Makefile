# Operator and developer entry points (see README.md).
.PHONY: setup run test bench chaos fuzz-build lint deb

setup:        ## install MariaDB, RabbitMQ, libzmq if missing, start MariaDB and RabbitMQ, build feedd
	bash .ci/setup
	cargo build --release

run: setup    ## serve in the foreground on conf/feed.ini
	./target/release/feedd --conf conf/feed.ini

test: lint    ## lint, unit + integration tests, then a quick benchmark smoke run (needs `make setup` once)
	FEEDD_TEST_PACKAGE=1 cargo test --quiet --locked -- --test-threads 4 --include-ignored
	cargo bench --locked --bench ingest -- --quick
	cargo bench --locked --bench amqp -- --quick
	cargo bench --locked --bench chaos -- --secs 15
	cargo bench --locked --bench cluster -- --quick
	cargo build --locked --manifest-path tests/fuzz/Cargo.toml

deb:          ## the Debian package, target/debian/feedd_*.deb (needs `cargo install cargo-deb`)
	cargo deb --locked

bench:        ## the ingest and AMQP benchmarks with their baselines, then Galera and TLS costs
	cargo bench --bench ingest
	cargo bench --bench amqp
	cargo bench --bench cluster

chaos:        ## 10 minutes of random faults under load; prints the invariant counts
	cargo bench --bench chaos -- --secs 600

lint:         ## rustfmt and clippy with warnings as errors (CI runs it through `make test`)
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	# src/ (library and binaries): no function over 80 lines (clippy.toml); tests and benches may.
	cargo clippy --lib --bins -- -D warnings -W clippy::too_many_lines
