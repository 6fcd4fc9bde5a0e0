// Command etcd is etcd's own server entry point, built from go.etcd.io/etcd/server/v3 at
// the version kube-apiserver v1.37 is built against, so that the tests' control plane
// needs nothing but the Go module proxy.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
