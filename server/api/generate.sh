#!/usr/bin/env bash
# Regenerates the gRPC code of the server APIs (make proto). Needs protoc
# (Debian: protobuf-compiler) and the protoc-gen-go / protoc-gen-go-grpc
# plugins, which it installs at the versions go.mod pins.
set -euo pipefail
cd "$(dirname "$0")"
export PATH="$PATH:$(go env GOPATH)/bin"
command -v protoc >/dev/null || { echo "protoc missing: apt-get install protobuf-compiler" >&2; exit 1; }
GOFLAGS= go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
GOFLAGS= go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
protoc -I . \
  --go_out=. --go_opt=paths=source_relative \
  --go-grpc_out=. --go-grpc_opt=paths=source_relative \
  agent/v1/agent.proto admin/v1/admin.proto
