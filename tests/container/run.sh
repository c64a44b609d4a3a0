#!/bin/bash
# Proves Dockerfile, pod.yaml and deploy/native-sidecar.yaml in a real
# container runtime (podman): builds the image, plays each Pod against a fake
# TMDB on the host's loopback, and checks what the main container gets; with
# the key in a Secret volume, that a rotation is used without a restart. Runs
# as root (as CI does); installs podman from Debian. Needs host ports 8080 and
# 9901 free: the Pods use host networking.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
export CONTAINERS_CONF=$here/containers.conf
base=localhost/debian-python:bookworm
image=ambassador:0.1.0  # the name pod.yaml and the README use
ctr=movies-ambassador   # podman names a played container POD-CONTAINER
work=$(mktemp -d)
passed=0 failed=0 report="" step=setup fake_pid=""
started=$SECONDS

check() {  # check DESCRIPTION COMMAND...: records pass/fail and goes on
    local what=$1; shift
    if "$@" >"$work/check.out" 2>&1; then
        report+="PASS  $what"$'\n'; passed=$((passed + 1))
    else
        report+="FAIL  $what"$'\n'; failed=$((failed + 1))
        sed 's/^/      /' "$work/check.out" >&2
    fi
}

quiet() {  # quiet COMMAND...: shows the command's output only if it fails
    "$@" >"$work/quiet.log" 2>&1 || { local status=$?; cat "$work/quiet.log" >&2; return "$status"; }
}

finish() {
    local status=$?
    podman pod rm --force --time 0 movies >/dev/null 2>&1 || true
    podman secret rm themoviedb >/dev/null 2>&1 || true
    podman volume rm --force themoviedb >/dev/null 2>&1 || true
    if [ -n "$fake_pid" ]; then kill "$fake_pid" 2>/dev/null || true; fi
    rm -rf "$work"
    if [ "$status" -ne 0 ]; then
        report+="FAIL  $step (exit $status)"$'\n'; failed=$((failed + 1))
    fi
    printf '\n--- container check (%ss) ---\n%s' "$((SECONDS - started))" "$report"
    echo "container: $passed passed, $failed failed"
    exit $((failed > 0))  # an EXIT trap keeps the script's status unless it exits itself
}
trap finish EXIT

step="install podman, runc, debootstrap"
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
    quiet apt-get update
    DEBIAN_FRONTEND=noninteractive quiet apt-get install -y podman runc debootstrap
fi
step="host ports 8080 and 9901 are free (the Pod uses host networking)"
for port in 8080 9901; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then exit 1; fi
done
# Leftovers of an interrupted run would make kube play and secret create fail.
podman pod rm --force --time 0 movies >/dev/null 2>&1 || true
podman secret rm themoviedb >/dev/null 2>&1 || true
podman volume rm --force themoviedb >/dev/null 2>&1 || true

step="base image $base (no registry here: built from Debian)"
if ! podman image exists "$base"; then
    quiet debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,curl \
        bookworm "$work/rootfs"
    # What a slim image leaves out too: package caches and lists, docs, locales.
    rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/* \
        "$work"/rootfs/usr/share/{doc,man,info,locale}
    # An imported tarball has no environment: without PATH nothing is found.
    tar -C "$work/rootfs" -c . | podman import --quiet \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$base" >/dev/null
    rm -rf "$work/rootfs"
fi

step="build $image from the project's Dockerfile"
# pip in the build uses the host's CA bundle (mounted for RUN steps only, so
# nothing of this machine stays in the image) and the host's index, if set.
index_url=${PIP_INDEX_URL:-$(python3 -m pip config get global.index-url 2>/dev/null || true)}
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n%s\n' \
    "${index_url:+index-url = $index_url}" >"$work/pip.conf"
quiet podman build --network host --build-arg BASE="$base" \
    --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    --volume "$work/pip.conf:/etc/pip.conf:ro" \
    --tag "$image" "$root"
size=$(podman image inspect --format '{{.Size}}' "$image")
report+="INFO  image $image: $((size / 1000000)) MB"$'\n'
check "image keeps no build tools or caches (pip, setuptools, gcc, ~/.cache)" \
    podman run --rm --entrypoint sh "$image" -c \
    '! command -v gcc && ! python3 -m pip --version && ! python3 -c "import setuptools" && ! test -e /root/.cache'

step="fake TMDB on the host's loopback"
python3 -m venv "$work/venv"
quiet "$work/venv/bin/pip" install --disable-pip-version-check "$root"
apikey_b64=$(sed -n 's/^  apikey: //p' "$here/secret.yaml")
key=$(printf '%s' "$apikey_b64" | base64 -d)
FAKE_TMDB_API_KEY=$key "$work/venv/bin/python" "$here/fake_tmdb.py" >"$work/fake.url" &
fake_pid=$!
for _ in $(seq 50); do [ -s "$work/fake.url" ] && break; sleep 0.2; done
fake_url=$(head -1 "$work/fake.url")
[ -n "$fake_url" ]

# What both Pods are checked with. Each is played from a copy that
# podman_copy.py writes (it prints what it changed from the manifest).
play() {  # play MANIFEST
    printf '  played copy of %s:\n' "${1#"$root"/}" >&2
    "$work/venv/bin/python" "$here/podman_copy.py" "$1" "$fake_url" "$base" >"$work/played.yaml"
    # Without systemd podman cannot schedule the livenessProbe it turns into a
    # healthcheck, and says so; the readiness check stands in for the kubelet.
    quiet podman kube play --network host "$work/played.yaml"
    for _ in $(seq 50); do ready >/dev/null 2>&1 && break; sleep 0.2; done
}
ready() { podman exec movies-main curl -sf localhost:9901/readyz; }
movies() {  # movies [?QUERY]: what the main container gets from localhost:8080/movies, then the status
    podman exec movies-main curl -s -w '\n%{http_code}' "localhost:8080/movies${1:-}" || true
}
got_movies() {  # got_movies ANSWER: the fake TMDB's movies, with status 200
    python3 -c 'import json, sys; body, _, status = sys.argv[1].rpartition("\n")
titles = {m["title"] for m in json.loads(body or "{}").get("results", [])}
assert status == "200" and {"Fight Club", "The Matrix"} <= titles, sys.argv[1][:500]' "$1"
}
stop_pod() {  # stop_pod MANIFEST: stops the Pod within the manifest's grace period, keeps the log
    # podman 4.3 does not take terminationGracePeriodSeconds from the Pod: pass it.
    local grace stop_started stop_took
    grace=$(sed -n 's/^  terminationGracePeriodSeconds: //p' "$1")
    stop_started=$SECONDS
    quiet podman pod stop --time "$grace" movies
    stop_took=$((SECONDS - stop_started))
    check "stopping the Pod: ambassador exits 0 within the ${grace}s grace period (took ${stop_took}s)" \
        test "$(podman inspect --format '{{.State.ExitCode}}' "$ctr")" = 0 -a "$stop_took" -lt "$grace"
    podman logs "$ctr" >"$work/ambassador.log" 2>&1
    quiet podman pod rm --force --time 0 movies
}

step="Secret themoviedb from tests/container/secret.yaml, as secretKeyRef reads it"
# podman 4.3 reads a secretKeyRef from a flat JSON object of key -> base64 value.
printf '{"apikey": "%s"}' "$apikey_b64" >"$work/secret.json"
podman secret create themoviedb "$work/secret.json" >/dev/null

step="play pod.yaml"
play "$root/pod.yaml"

step="checks of pod.yaml"
check "readiness: GET localhost:9901/readyz answers 200" ready
# As in the pattern's article: kubectl exec movies -c main -- curl localhost:8080/movies
check "main container: curl localhost:8080/movies returns the fake TMDB's movies" got_movies "$(movies)"
check "ambassador runs as a non-root user (uid 10001)" \
    test "$(podman top "$ctr" huser | tail -1)" = 10001
# As root, so that only a read-only filesystem can refuse the write.
check "ambassador's root filesystem is read-only" \
    sh -c "podman exec --user 0 $ctr touch /probe 2>&1 | grep -q 'Read-only file system'"
check "dropin.cache is pre-built (no attempt to rewrite it on the read-only fs)" \
    sh -c "! podman logs $ctr 2>&1 | grep -i 'plugin cache'"

step="stop pod.yaml's Pod"
stop_pod "$root/pod.yaml"
printf '%s\n' "$key" >"$work/key"
check "the ambassador logged the request, and never the API key" \
    sh -c "grep -q 'GET /movies 200' $work/ambassador.log && ! grep -qF -f $work/key $work/ambassador.log"

step="Secret themoviedb from tests/container/secret.yaml, as a Secret volume reads it"
# podman 4.3 fills a Secret volume from a podman secret holding the whole
# Secret object, and writes each data value into its file as it is, without
# decoding the base64: so the object holds the decoded key.
podman secret rm themoviedb >/dev/null
printf '{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "themoviedb"}, "data": {"apikey": "%s"}}' \
    "$key" >"$work/secret-object.json"
podman secret create themoviedb "$work/secret-object.json" >/dev/null

step="play deploy/native-sidecar.yaml (as an ordinary sidecar: podman 4.3 has no native ones)"
play "$root/deploy/native-sidecar.yaml"

step="checks of deploy/native-sidecar.yaml"
reads_key_file() {
    podman exec "$ctr" sh -c 'test -z "$TMDB_API_KEY" && test -s "$TMDB_API_KEY_FILE"' && ready
}
check "readiness: GET localhost:9901/readyz answers 200, the key read from TMDB_API_KEY_FILE" reads_key_file
check "main container: curl localhost:8080/movies returns the fake TMDB's movies" got_movies "$(movies)"
# The kubelet swaps a Secret volume's content in one rename (of its ..data
# link): rotate() renames the key file in the volume podman made from the secret.
volume=$(podman volume inspect --format '{{.Mountpoint}}' themoviedb)
rotate() {  # rotate KEY: the Secret's new value, then waits until the ambassador says it read it
    local before
    before=$(podman logs "$ctr" 2>&1 | grep -c 'themoviedb/apikey changed' || true)
    printf '%s' "$1" >"$volume/..apikey.new"
    mv -f "$volume/..apikey.new" "$volume/apikey"
    for _ in $(seq 25); do  # the ambassador checks the file every second
        [ "$(podman logs "$ctr" 2>&1 | grep -c 'themoviedb/apikey changed')" -gt "$before" ] && return
        sleep 0.2
    done
    return 1
}
rotated_key=rotated-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')  # one the fake TMDB refuses
started_at=$(podman inspect --format '{{.State.StartedAt}}' "$ctr")
refused() {  # refused ANSWER: 502 credential-rejected, from the ambassador that was running before
    [ "${1##*$'\n'}" = 502 ] && grep -q credential-rejected <<<"$1" &&
        [ "$(podman inspect --format '{{.State.StartedAt}}' "$ctr")" = "$started_at" ]
}
# Each request asks another URL: no cached answer stands in for the upstream's.
check "Secret rotated to a key the fake TMDB refuses: the ambassador reads it within 5 s" rotate "$rotated_key"
check "  ... and the next request is refused with it (502 credential-rejected), without a restart" \
    refused "$(movies '?page=2')"
check "Secret rotated back: the ambassador reads it within 5 s" rotate "$key"
check "  ... and the next request gets the fake TMDB's movies" got_movies "$(movies '?sort_by=vote_count.desc')"

step="stop deploy/native-sidecar.yaml's Pod"
stop_pod "$root/deploy/native-sidecar.yaml"
printf '%s\n%s\n' "$key" "$rotated_key" >"$work/keys"
check "the ambassador logged both rotations, and never a key" \
    sh -c "test \$(grep -c 'themoviedb/apikey changed' $work/ambassador.log) = 2 && ! grep -qF -f $work/keys $work/ambassador.log"
