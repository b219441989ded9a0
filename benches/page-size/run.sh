#!/bin/bash
# The images' arm64 binaries on an arm64 kernel with 64 KiB pages (or 16 KiB: PAGE=16k), under
# qemu-system-aarch64; with a kubeconfig (`cargo run -p xtask -- up`'s), the ingress controller
# then serves an Ingress through that apiserver while oha sends it HTTP/1.1, HTTPS and h2.
#   benches/page-size/run.sh [KUBECONFIG]
# Ports 18080, 18443 (the guest's, forwarded) and 18090 (the backend) must be free.
# Needs: apt-get install linux-source-6.1 flex bison bc libssl-dev libelf-dev qemu-system-arm
#   gcc-aarch64-linux-gnu cpio; `cargo run -p xtask -- images --arch arm64` first (the binaries),
#   `cargo run -p xtask -- bench proxy --smoke` once (oha and bench-backend).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
WORK=${WORK:-$ROOT/target/page-size}
PAGE=${PAGE:-64k}
case $PAGE in 16k|64k) ;; *) echo "PAGE must be 16k or 64k, not $PAGE" >&2; exit 2 ;; esac
KC=""
[ -n "${1:-}" ] && KC=$(realpath "$1")
K=()
[ -n "$KC" ] && K=("$HOME/.cache/homecluster/k8s-v1.20.2-2/bin/kubectl" --kubeconfig "$KC")
# The guest's kubeconfig carries the cluster's admin credentials: private, and removed on exit.
umask 077
mkdir -p "$WORK"
cd "$WORK"
QEMU="" BACKEND="" CREATED=""
cleanup() {
  [ -n "$QEMU" ] && { kill "$QEMU" 2>/dev/null || true; }
  [ -n "$BACKEND" ] && { kill "$BACKEND" 2>/dev/null || true; }
  rm -f root/t/kubeconfig initrd.gz tls.key
  if [ -n "$CREATED" ]; then
    "${K[@]}" delete namespace pagesize --wait=false >/dev/null 2>&1 || true
    "${K[@]}" delete ingressclass pagesize >/dev/null 2>&1 || true
  fi
  return 0
}
trap cleanup EXIT
# The kernel: tinyconfig plus what the binaries and the VM need (kernel.config); built again
# when the fragment changes.
stamp=$(sha256sum "$HERE/kernel.config" | cut -c1-16)
if [ ! -e "linux-$PAGE/arch/arm64/boot/Image" ] || [ "$(cat "linux-$PAGE/.fragment" 2>/dev/null)" != "$stamp" ]; then
  rm -rf "linux-$PAGE" && mkdir "linux-$PAGE"
  tar xJf /usr/src/linux-source-6.1.tar.xz -C "linux-$PAGE" --strip-components=1
  (cd "linux-$PAGE"
   export ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-
   make tinyconfig >/dev/null
   sed "s/CONFIG_ARM64_64K_PAGES=y/CONFIG_ARM64_${PAGE^^}_PAGES=y/" "$HERE/kernel.config" > page.config
   scripts/kconfig/merge_config.sh -m .config page.config >/dev/null
   make olddefconfig >/dev/null
   grep -q "^CONFIG_ARM64_${PAGE^^}_PAGES=y" .config || { echo "the kernel config lost its page size" >&2; exit 1; }
   make -j"$(nproc)" Image >/dev/null
   echo "$stamp" > .fragment)
fi
# The initramfs: busybox and the binaries.
rm -rf root && mkdir -p root/{bin,dev,proc,sys,tmp,t}
deb=$(find ~/.cache/homecluster/debs/arm64 -name 'busybox-static_*_arm64.deb' | head -1)
dpkg-deb -x "$deb" bb
cp bb/bin/busybox root/bin/
for a in sh mount ip sed date grep head cat sleep kill poweroff uname; do ln -s busybox root/bin/$a; done
cp "$HERE/init" root/init
BIN=$ROOT/target/aarch64-unknown-linux-musl/small-images
for b in ingress-controller cert-manager-controller cert-manager-cainjector cert-manager-webhook flanneld flannel local-path-provisioner; do
  cp "$BIN/$b" root/t/
done
if [ -n "$KC" ]; then
  if "${K[@]}" get namespace pagesize >/dev/null 2>&1; then
    echo "namespace pagesize exists (a run still cleaning up, or not ours): not touching it" >&2
    exit 1
  fi
  CREATED=1
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=pagesize.test -addext subjectAltName=DNS:pagesize.test -keyout tls.key -out tls.crt 2>/dev/null
  "${K[@]}" create namespace pagesize
  "${K[@]}" -n pagesize create secret tls pagesize-tls --cert=tls.crt --key=tls.key
  # The backend runs on the host; the guest reaches it (and the apiserver) at 10.0.2.2.
  "${K[@]}" apply -f - <<YAML
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: pagesize}
spec: {controller: homecluster.dev/pagesize}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: pagesize}
spec: {ports: [{name: http, port: 80, targetPort: 18090}]}
---
apiVersion: discovery.k8s.io/v1beta1
kind: EndpointSlice
metadata:
  name: echo-host
  namespace: pagesize
  labels: {kubernetes.io/service-name: echo, endpointslice.kubernetes.io/managed-by: page-size-check}
addressType: IPv4
endpoints: [{addresses: ["10.0.2.2"], conditions: {ready: true}}]
ports: [{name: http, port: 18090, protocol: TCP}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: echo
  namespace: pagesize
  annotations: {nginx.ingress.kubernetes.io/ssl-redirect: "false"}
spec:
  ingressClassName: pagesize
  tls: [{hosts: [pagesize.test], secretName: pagesize-tls}]
  rules:
  - host: pagesize.test
    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: echo, port: {number: 80}}}}]}
YAML
  "${K[@]}" config view --raw --minify > root/t/kubeconfig
  # 127.0.0.1 is the guest itself; qemu's user network maps 10.0.2.2 to the host's loopback.
  sed -i -E 's#^( +)server: https://127\.0\.0\.1:([0-9]+)#\1server: https://10.0.2.2:\2\n\1tls-server-name: 127.0.0.1#' root/t/kubeconfig
  "$ROOT/target/release/bench-backend" --plain 127.0.0.1:18090 --threads 1 > backend.log 2>&1 &
  BACKEND=$!
fi
(cd root && find . | cpio -o -H newc 2>/dev/null | gzip -1) > initrd.gz
qemu-system-aarch64 -M virt -cpu max -m 1024 -smp 2 -nographic \
  -netdev user,id=n0,hostfwd=tcp:127.0.0.1:18080-:80,hostfwd=tcp:127.0.0.1:18443-:443 \
  -device virtio-net-device,netdev=n0 -kernel "linux-$PAGE/arch/arm64/boot/Image" -initrd initrd.gz \
  -append "console=ttyAMA0 rdinit=/init quiet hostdate=$(date +%s)" > guest.log 2>&1 &
QEMU=$!
guest() { grep -a '===' guest.log || true; }
page_ok() { grep -aq "KernelPageSize: *${PAGE%k} kB" guest.log; }
if [ -z "$KC" ]; then
  wait "$QEMU" || true
  QEMU=""
  guest
  page_ok || { echo "the guest did not report ${PAGE%k} KiB pages" >&2; exit 1; }
  exit 0
fi
code=""
for _ in $(seq 120); do
  kill -0 "$QEMU" 2>/dev/null || { guest; echo "the VM stopped" >&2; exit 1; }
  code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H 'Host: pagesize.test' http://127.0.0.1:18080/ || true)
  [ "$code" = 200 ] && break
  sleep 5
done
[ "$code" = 200 ] || { guest; echo "no answer from the guest's ingress controller" >&2; exit 1; }
page_ok || { guest; echo "the guest did not report ${PAGE%k} KiB pages" >&2; exit 1; }
O=$HOME/.cache/homecluster/oha/bin/oha
to="--connect-to pagesize.test:80:127.0.0.1:18080 --connect-to pagesize.test:443:127.0.0.1:18443"
for run in "http://pagesize.test/" "--insecure https://pagesize.test/" "--insecure --http2 -p 8 https://pagesize.test/"; do
  echo "== oha $run"
  # shellcheck disable=SC2086
  $O -z 60s -c 16 --no-tui $to $run | grep -E 'Success rate|Requests/sec|\[[0-9]{3}\] [0-9]+ responses|aborted' || true
done
sleep 10
guest
