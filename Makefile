# Ironroot build, test and demo entry points. Every target that needs the
# TPM/HSM tooling depends on `deps`, which installs what is missing.

SHELL := /bin/bash
GO ?= go
export PATH := $(PATH):/usr/local/go/bin:$(HOME)/go/bin
export CGO_ENABLED := 1

# Debian packages the project uses: swtpm and its tools manufacture software
# TPMs, softhsm2 is the PKCS#11 token, tpm2-tools/opensc/gnutls-bin are the
# tools operators use against them.
DEB_PACKAGES := swtpm swtpm-tools softhsm2 tpm2-tools opensc gnutls-bin gcc

BIN := bin
CMDS := $(notdir $(wildcard cmd/*))
TEST_TIMEOUT ?= 15m
BENCH ?= .
BENCHTIME ?= 2s

.PHONY: all deps build test vet fmt bench demo demo-down proto clean

all: build

deps:
	@missing=""; for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then echo "deps: all packages present"; exit 0; fi; \
	if [ "$$(id -u)" != "0" ]; then \
	  echo "deps: missing Debian packages:$$missing"; \
	  echo "deps: run 'make deps' as root (or: sudo apt-get install$$missing)"; exit 1; \
	fi; \
	echo "deps: installing$$missing"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing

build:
	@mkdir -p $(BIN)
	$(GO) build -o $(BIN)/ ./cmd/...

vet:
	$(GO) vet ./...

fmt:
	gofmt -l -w $$(git ls-files '*.go')

test: deps vet
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) test -race -count=1 -timeout $(TEST_TIMEOUT) ./...

bench: deps
	$(GO) test -run '^$$' -bench '$(BENCH)' -benchtime $(BENCHTIME) -benchmem ./...

demo: deps build
	./simulator/demo.sh up

demo-down:
	./simulator/demo.sh down

proto:
	./server/api/generate.sh

clean:
	rm -rf $(BIN)
