// Command whoami: the AWS SDK for Go v2's default credential chain, then STS GetCallerIdentity,
// as a Kubernetes controller in a pod would do it. podiam's SDK matrix runs it inside pods.
//
// Usage: whoami [seconds]. With seconds > 0 it calls GetCallerIdentity once a second for that
// long, so the SDK's own credential cache has to refresh through the metadata service. Each
// call prints one JSON line; any failed call makes the exit code 1.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/sts"
)

type result struct {
	Arn         string `json:"arn,omitempty"`
	AccessKeyID string `json:"access_key_id,omitempty"`
	Prefix      string `json:"access_key_id_prefix,omitempty"`
	Expiration  string `json:"expiration,omitempty"`
	Error       string `json:"error,omitempty"`
}

func emit(r result) {
	line, _ := json.Marshal(r)
	fmt.Println(string(line))
}

func main() {
	seconds := 0
	if len(os.Args) > 1 {
		seconds, _ = strconv.Atoi(os.Args[1])
	}
	ctx := context.Background()
	cfg, err := config.LoadDefaultConfig(ctx)
	if err != nil {
		emit(result{Error: err.Error()})
		os.Exit(1)
	}
	client := sts.NewFromConfig(cfg)
	failed := false
	deadline := time.Now().Add(time.Duration(seconds) * time.Second)
	for {
		var r result
		creds, err := cfg.Credentials.Retrieve(ctx) // the SDK's cache: the same answer the call signs with
		if err != nil {
			r.Error = err.Error()
		} else {
			r.AccessKeyID = creds.AccessKeyID
			r.Prefix = creds.AccessKeyID[:min(4, len(creds.AccessKeyID))]
			if creds.CanExpire {
				r.Expiration = creds.Expires.UTC().Format(time.RFC3339)
			}
			out, err := client.GetCallerIdentity(ctx, &sts.GetCallerIdentityInput{})
			if err != nil {
				r.Error = err.Error()
			} else {
				r.Arn = *out.Arn
			}
		}
		failed = failed || r.Error != ""
		emit(r)
		if !time.Now().Before(deadline) {
			break
		}
		time.Sleep(time.Second)
	}
	if failed {
		os.Exit(1)
	}
}
