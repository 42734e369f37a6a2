package main

import (
	"strings"
	"testing"
)

func TestStrip(t *testing.T) {
	src := `syntax = "proto3";
import "gogoproto/gogo.proto";
import "etcd/api/mvccpb/kv.proto";
import "google/api/annotations.proto";
option (gogoproto.marshaler_all) = true;
option (grpc.gateway.protoc_gen_openapiv2.options.openapiv2_swagger) = {
  security_definitions: { security: { key: "ApiKey" value: { type: TYPE_API_KEY } } }
};
service KV {
  rpc Range(RangeRequest) returns (RangeResponse) {
      option (google.api.http) = {
        post: "/v3/kv/range"
        body: "*"
    };
  }
}
message RangeRequest { bytes key = 1 [(gogoproto.nullable) = false]; }
`
	got := string(strip([]byte(src)))
	for _, gone := range []string{"gogoproto", "google/api", "option (", "openapiv2", "post:"} {
		if strings.Contains(got, gone) {
			t.Errorf("%q left in:\n%s", gone, got)
		}
	}
	for _, kept := range []string{`import "etcd/api/mvccpb/kv.proto";`, "rpc Range(RangeRequest) returns (RangeResponse) {", "bytes key = 1 ;"} {
		if !strings.Contains(got, kept) {
			t.Errorf("%q lost:\n%s", kept, got)
		}
	}
}
