"""Writes the copy of a Pod manifest that run.sh plays with podman 4.3, changed only where this machine
or that podman needs it, and says each change on stderr.

    python podman_copy.py MANIFEST FAKE_TMDB_URL MAIN_IMAGE > played.yaml

- the main container runs MAIN_IMAGE (no registry here to pull the manifest's image from);
- the ambassador gets TMDB_BASE_URL pointing at the fake TMDB;
- no ports: (host networking refuses port mappings);
- a native sidecar (an init container with restartPolicy: Always) becomes an ordinary container,
  without its startupProbe: podman 4.3 refuses probes on init containers and, without them, waits
  for the init container to exit before starting the next one, which a sidecar never does;
- a Secret volume gets optional: false, the default it means: without the field podman 4.3.1
  dereferences a nil pointer and crashes.
"""

import sys

import yaml


def say(change: str) -> None:
    print(f"    {change}", file=sys.stderr)


def main(manifest: str, fake_url: str, main_image: str) -> None:
    with open(manifest) as f:
        pod = yaml.safe_load(f)
    spec = pod["spec"]
    sidecars = [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    for sidecar in sidecars:
        spec["initContainers"].remove(sidecar)
        del sidecar["restartPolicy"], sidecar["startupProbe"]
        spec["containers"].insert(0, sidecar)
        say(f"native sidecar {sidecar['name']} moved to containers, without restartPolicy and startupProbe")
    if not spec.get("initContainers", True):
        del spec["initContainers"]
    for container in spec["containers"]:
        if container.pop("ports", None):
            say(f"{container['name']}: ports dropped")
        if container["image"].startswith("ambassador:"):
            container.setdefault("env", []).append({"name": "TMDB_BASE_URL", "value": fake_url})
            say(f"{container['name']}: TMDB_BASE_URL={fake_url}")
        else:
            container["image"] = main_image
            say(f"{container['name']}: image {main_image}")
    for volume in spec.get("volumes", []):
        if "secret" in volume and "optional" not in volume["secret"]:
            volume["secret"]["optional"] = False
            say(f"volume {volume['name']}: optional: false")
    yaml.safe_dump(pod, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
