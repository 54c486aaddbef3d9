# Operator and developer entry points (see README.md).
.PHONY: setup run test bench lint

setup:        ## install MariaDB + libzmq if missing, start MariaDB, build feedd
	bash .ci/setup
	cargo build --release

run: setup    ## serve in the foreground on conf/feed.ini
	./target/release/feedd --conf conf/feed.ini

test:         ## unit + integration tests, then a quick benchmark smoke run (needs `make setup` once)
	cargo test --quiet --locked -- --test-threads 4
	cargo bench --locked --bench ingest -- --quick

bench:        ## the ingest benchmark with its baselines
	cargo bench --bench ingest

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
