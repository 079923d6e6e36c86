"""`raysim k8s render CONFIG [key=value ...] --image IMAGE [--gpus-per-worker N]
[--workers N] [--run-root ROOT] [--env-secret NAME] [--out FILE]`: a KubeRay RayJob for
an experiment, as YAML.

The output has two documents: a ConfigMap holding the resolved experiment config, and a
RayJob whose head mounts it at /config and runs

    raysim run /config/config.yaml --out ROOT/NAME --auto-resume

which resumes whenever that run directory already holds a run. ROOT is /storage/runs on
a shared PersistentVolumeClaim, or a filesystem URL (s3://bucket/prefix, with credentials
from a Secret given by --env-secret), so when the RayJob is retried (`backoffLimit`: a
new Ray cluster each time) the run continues from its last checkpoint.

The same inputs always give byte-identical output (fixed key order, no timestamps), so
rendered manifests can be committed and diffed. Pods run as a non-root user with equal
requests and limits."""
from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import yaml

EXIT_BAD_INPUT = 2
UID = 1000  # the `ray` user of the Dockerfile
CONFIG_MOUNT = "/config"
STORAGE_MOUNT = "/storage"
DEFAULT_OPERATOR_NAMESPACE = "kuberay-system"  # where docs/kubernetes.md installs it
DEFAULT_PVC = "raysim-storage"
DEFAULT_RUN_ROOT = f"{STORAGE_MOUNT}/runs"
# Per-pod headroom on top of what the actors need: raylet, object store, log monitor, agent.
POD_EXTRA_CPUS = 1
POD_EXTRA_MEMORY_GIB = 2
OBJECT_STORE_SHARE = 0.3  # Ray's default object store size; /dev/shm is sized to match


class RenderError(Exception):
    """A user-facing problem with the render arguments: exit code 2."""


def ray_version() -> str:
    return version("ray")


def add_commands(subparsers) -> None:
    """Add `k8s render` to the `raysim` argparse subparsers."""
    k8s = subparsers.add_parser("k8s", help="Kubernetes (KubeRay) manifests")
    actions = k8s.add_subparsers(dest="k8s_command", required=True)
    render_p = actions.add_parser("render", help="write a ConfigMap + RayJob that runs an experiment")
    render_p.add_argument("config", help="experiment YAML, e.g. configs/quickstart.yaml")
    render_p.add_argument("overrides", nargs="*", help="key.sub=value overrides, baked into the ConfigMap")
    render_p.add_argument("--image", required=True, help="image with raysim installed, e.g. REGISTRY/raysim:0.1.0-ray2.60.0")
    render_p.add_argument(
        "--workers", type=int, help="ClientWorker actors of the default group (default: the config's runtime.num_workers)"
    )
    render_p.add_argument(
        "--gpus-per-worker", type=float,
        help="GPUs per actor of the default group, fractions allowed (default: the config's); runtime.worker_groups "
        "bring their own",
    )  # fmt: skip
    render_p.add_argument("--memory-per-worker", type=float, default=8.0, help="GiB of memory per worker actor (default 8)")
    render_p.add_argument("--pvc", default=DEFAULT_PVC, help=f"ReadWriteMany claim for runs and caches (default {DEFAULT_PVC})")
    render_p.add_argument("--backoff-limit", type=int, default=3, help="RayJob retries; each resumes the run (default 3)")
    render_p.add_argument(
        "--run-root",
        default=DEFAULT_RUN_ROOT,
        help=f"where the run directory <root>/<job name> goes: a path on the claim or a URL such as s3://bucket/runs "
        f"(default {DEFAULT_RUN_ROOT})",
    )
    render_p.add_argument(
        "--env-secret", metavar="NAME", help="a Secret whose keys become environment variables of every Ray pod "
        "(e.g. AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for an s3:// --run-root)",
    )  # fmt: skip
    render_p.add_argument(
        "--operator-namespace", default=DEFAULT_OPERATOR_NAMESPACE,
        help=f"namespace of the KubeRay operator, which the NetworkPolicy lets reach the dashboard (default {DEFAULT_OPERATOR_NAMESPACE})",
    )  # fmt: skip
    render_p.add_argument("--out", help="write the manifest here (default: stdout)")
    k8s.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    from raysim.config import ConfigError

    try:
        text = render(
            args.config, args.overrides, args.image, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
            memory_per_worker_gib=args.memory_per_worker, pvc=args.pvc, backoff_limit=args.backoff_limit,
            run_root=args.run_root, env_secret=args.env_secret, operator_namespace=args.operator_namespace,
        )  # fmt: skip
    except (RenderError, ConfigError) as err:
        print(f"raysim: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


@dataclass(frozen=True)
class Layout:
    """How worker actors map onto worker pods. A GPU pod holds ceil(gpus_per_worker)
    GPUs (at least 1) and as many actors as share them; a CPU pod holds one actor."""

    actors: int
    actors_per_pod: int
    pods: int
    gpus_per_pod: int
    ray_cpus_per_pod: int  # what Ray schedules on; the container gets POD_EXTRA_CPUS more
    memory_per_pod_gib: int


def layout(actors: int, gpus_per_worker: float, cpus_per_worker: float, memory_per_worker_gib: float) -> Layout:
    if gpus_per_worker > 0:
        gpus_per_pod = max(1, math.ceil(gpus_per_worker))
        per_pod = max(1, math.floor(gpus_per_pod / gpus_per_worker + 1e-9))
    else:
        gpus_per_pod, per_pod = 0, 1
    per_pod = min(per_pod, actors)
    return Layout(
        actors=actors,
        actors_per_pod=per_pod,
        pods=math.ceil(actors / per_pod),
        gpus_per_pod=gpus_per_pod,
        ray_cpus_per_pod=math.ceil(per_pod * cpus_per_worker),
        memory_per_pod_gib=math.ceil(per_pod * memory_per_worker_gib + POD_EXTRA_MEMORY_GIB),
    )


def _dns_name(name: str) -> str:
    # RFC 1123 label; KubeRay appends suffixes to the RayJob name, so keep it short.
    clean = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return f"raysim-{clean}"[:40].rstrip("-")


def _check_image(image: str) -> None:
    """An image tag that names a Ray version (…-rayX.Y.Z) must name the installed one:
    a client and a cluster on different Ray versions cannot talk to each other."""
    tag = image.rsplit("/", 1)[-1].partition("@")[0].rpartition(":")[2]
    found = re.search(r"-ray(\d+\.\d+\.\d+)$", tag)
    if found and found.group(1) != ray_version():
        raise RenderError(
            f"--image {image} is built for Ray {found.group(1)}, but this raysim pins Ray {ray_version()}; "
            f"build and push raysim:<version>-ray{ray_version()} (see Dockerfile)"
        )


def _experiment(config_path: str, overrides: list[str], workers: int | None, gpus: float | None):
    """(validated config, the config file's mapping with every override applied). The
    ConfigMap carries the latter: only what the experiment says, so it stays valid when
    raysim adds config keys with defaults."""
    from raysim.config import apply_overrides, load_config

    cfg = load_config(config_path, overrides)  # clear errors for the file and the user's overrides
    rt = cfg.runtime
    workers = rt.num_workers if workers is None else workers
    gpus = rt.num_gpus_per_worker if gpus is None else gpus
    if workers < 1:
        raise RenderError(
            f"--workers must be at least 1 on a cluster (got {workers}; runtime.num_workers=0 is local mode)"
        )
    if gpus < 0:
        raise RenderError(f"--gpus-per-worker must be >= 0 (got {gpus})")
    # Join the job's cluster (RAY_ADDRESS); 'auto' device: CUDA on GPU workers, CPU on the
    # GPU-less head where the driver may evaluate.
    any_gpu = gpus > 0 or any(g.num_gpus > 0 for g in rt.worker_groups)
    everything = [
        *overrides,
        f"runtime.num_workers={workers}",
        f"runtime.num_gpus_per_worker={gpus:g}",
        f"runtime.device={'auto' if any_gpu else 'cpu'}",
        "runtime.ray_address=auto",
    ]
    raw = apply_overrides(yaml.safe_load(Path(config_path).read_text()) or {}, everything)
    return load_config(config_path, everything), raw, everything


def entrypoint(run_dir: str) -> str:
    """Resume when the run directory (path or URL) already holds a run (a RayJob retry),
    else start: `raysim run --auto-resume` decides, so no shell test is needed."""
    return shlex.join(["raysim", "run", f"{CONFIG_MOUNT}/config.yaml", "--out", run_dir, "--auto-resume"])


def _security_context() -> dict:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _pod_security_context() -> dict:
    # fsGroup makes the PVC writable by the non-root user.
    return {
        "runAsNonRoot": True,
        "runAsUser": UID,
        "runAsGroup": UID,
        "fsGroup": UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _resources(cpus: int, memory_gib: int, gpus: int = 0) -> dict:
    # requests == limits: Guaranteed QoS, and Ray reads its CPU/GPU/memory from the limits.
    amounts = {"cpu": str(cpus), "memory": f"{memory_gib}Gi"}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _container(
    name: str, image: str, resources: dict, mounts: list[dict], ports: list[dict] | None = None, env_secret: str | None = None
) -> dict:
    c = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "env": [
            {"name": "RAYSIM_CACHE", "value": f"{STORAGE_MOUNT}/cache"},  # pre-trained bases, built once
            {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        ],
        "resources": resources,
        "securityContext": _security_context(),
        "volumeMounts": mounts,
    }
    if env_secret:  # e.g. object-store credentials: the driver and the workers write the run
        c["envFrom"] = [{"secretRef": {"name": env_secret}}]
    if ports:
        c["ports"] = ports
    return c


def _volumes(pvc: str, memory_gib: int, config_map: str | None = None) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts): shared storage, a memory-backed /dev/shm for Ray's object store
    (the container default of 64 MiB would push it to disk), and the config if given."""
    shm = f"{max(1, math.ceil(memory_gib * OBJECT_STORE_SHARE))}Gi"
    volumes = [
        {"name": "storage", "persistentVolumeClaim": {"claimName": pvc}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}},
    ]
    mounts = [{"name": "storage", "mountPath": STORAGE_MOUNT}, {"name": "dshm", "mountPath": "/dev/shm"}]
    if config_map:
        volumes.append({"name": "config", "configMap": {"name": config_map}})
        mounts.append({"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True})
    return volumes, mounts


def _head_group(image: str, pvc: str, config_map: str, env_secret: str | None = None) -> dict:
    memory = 8
    volumes, mounts = _volumes(pvc, memory, config_map)
    ports = [
        {"name": "gcs-server", "containerPort": 6379},
        {"name": "dashboard", "containerPort": 8265},
        {"name": "metrics", "containerPort": 8080},
    ]
    return {
        "serviceType": "ClusterIP",  # reachable inside the cluster only; watch it with port-forward
        "rayStartParams": {
            # The operator polls job status and the submitter pod submits through the head
            # Service, so the dashboard must listen on the pod's interfaces, not 127.0.0.1;
            # written out (rather than left to KubeRay's default) to make that visible.
            "dashboard-host": "0.0.0.0",
            "num-cpus": "0",  # no client workers on the head: it runs the driver and the GCS
        },
        "template": {
            "metadata": {"labels": {"app.kubernetes.io/name": "raysim", "app.kubernetes.io/component": "head"}},
            "spec": {
                "securityContext": _pod_security_context(),
                "containers": [_container("ray-head", image, _resources(2, memory), mounts, ports, env_secret)],
                "volumes": volumes,
            },
        },
    }


def ray_resources_param(per_pod: dict[str, float]) -> str:
    """rayStartParams.resources in the form KubeRay passes to `ray start` and Ray's
    autoscaler parses: a JSON object with escaped quotes, in quotes, integer amounts."""
    return '"' + json.dumps(per_pod, sort_keys=True).replace('"', '\\"') + '"'


def _worker_group(
    image: str, pvc: str, lay: Layout, env_secret: str | None = None, name: str | None = None,
    resources_per_actor: dict[str, float] | None = None,
) -> dict:  # fmt: skip
    volumes, mounts = _volumes(pvc, lay.memory_per_pod_gib)
    resources = _resources(lay.ray_cpus_per_pod + POD_EXTRA_CPUS, lay.memory_per_pod_gib, lay.gpus_per_pod)
    spec = {
        "securityContext": _pod_security_context(),
        "containers": [_container("ray-worker", image, resources, mounts, env_secret=env_secret)],
        "volumes": volumes,
    }
    if lay.gpus_per_pod:
        # GPU node pools are commonly tainted so that only GPU pods land there.
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # Ray schedules on exactly the actors' CPUs; the container keeps the headroom.
    start_params = {"num-cpus": str(lay.ray_cpus_per_pod)}
    if resources_per_actor:
        # Custom resources the group's actors ask for, for all actors of a pod (whole units:
        # Ray's autoscaler reads integers), so they land on this group's pods only.
        per_pod = {k: math.ceil(v * lay.actors_per_pod - 1e-9) for k, v in sorted(resources_per_actor.items()) if v}
        if per_pod:
            start_params["resources"] = ray_resources_param(per_pod)
    labels = {"app.kubernetes.io/name": "raysim", "app.kubernetes.io/component": "worker"}
    if name is not None:
        labels["raysim/worker-group"] = name
    return {
        "groupName": f"{name}-workers" if name else "gpu-workers" if lay.gpus_per_pod else "cpu-workers",
        # A fixed size: the job's actor pool is sized by runtime.num_workers (per worker
        # group). KubeRay recreates a lost pod; the pool re-queues that pod's clients meanwhile.
        "replicas": lay.pods,
        "minReplicas": lay.pods,
        "maxReplicas": lay.pods,
        "rayStartParams": start_params,
        "template": {"metadata": {"labels": labels}, "spec": spec},
    }


def _submitter(image: str) -> dict:
    # KubeRay fills in the `ray job submit` command; this only sets who runs it and how big.
    return {
        "spec": {
            "restartPolicy": "Never",
            "securityContext": _pod_security_context(),
            "containers": [
                {
                    "name": "ray-job-submitter",
                    "image": image,
                    "imagePullPolicy": "IfNotPresent",
                    "resources": {
                        "requests": {"cpu": "500m", "memory": "512Mi"},
                        "limits": {"cpu": "500m", "memory": "512Mi"},
                    },
                    "securityContext": _security_context(),
                }
            ],
        }
    }


def manifests(
    cfg, config_text: str, image: str, memory_per_worker_gib: float, pvc: str, backoff_limit: int,
    run_root: str = DEFAULT_RUN_ROOT, env_secret: str | None = None, source: str = "<config>",
) -> tuple[dict, dict, list[tuple[str, Layout]]]:  # fmt: skip
    """(ConfigMap, RayJob, (worker group name, layout) per worker group)."""
    from raysim import algorithms
    from raysim.run import groups

    rt = cfg.runtime
    resolved, _ = groups.resolve(cfg, algorithms.load(cfg.algorithm.name)(cfg), source)
    specs, layouts = [], []
    for g in resolved:
        actors = g.clients if rt.placement == "dedicated" else g.num_workers
        lay = layout(actors, g.num_gpus, g.num_cpus, memory_per_worker_gib)
        # The default group keeps its cpu-workers / gpu-workers name: manifests of configs
        # without worker groups do not change.
        named = g.name if rt.worker_groups else None
        spec = _worker_group(image, pvc, lay, env_secret, named, g.resources)
        specs.append(spec)
        layouts.append((spec["groupName"], lay))
    group_names = [n for n, _ in layouts]
    if len(set(group_names)) != len(group_names):
        raise RenderError(f"worker group names must give distinct Kubernetes groups, got {group_names}")
    name = _dns_name(cfg.name)
    labels = {"app.kubernetes.io/name": "raysim", "raysim/experiment": name}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-config", "labels": labels},
        "data": {"config.yaml": config_text},
    }
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "entrypoint": entrypoint(f"{run_root.rstrip('/')}/{name}"),
            # Each retry gets a fresh Ray cluster; the entrypoint resumes from the run directory.
            "backoffLimit": backoff_limit,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "submitterPodTemplate": _submitter(image),
            "rayClusterSpec": {
                "rayVersion": ray_version(),
                # Ray's token authentication (Ray >= 2.52; the operator makes the Secret and
                # gives every Ray container the token: KubeRay >= 1.5.1): without it anyone
                # who reaches the dashboard or the GCS can run code with the job's credentials.
                "authOptions": {"mode": "token"},
                "enableInTreeAutoscaling": False,
                "headGroupSpec": _head_group(image, pvc, f"{name}-config", env_secret),
                "workerGroupSpecs": specs,
            },
        },
    }
    cluster = rayjob["spec"]["rayClusterSpec"]
    for template in [cluster["headGroupSpec"]["template"], *(g["template"] for g in specs), rayjob["spec"]["submitterPodTemplate"]]:
        _harden(template, labels)
    return config_map, rayjob, layouts


def _harden(template: dict, experiment_labels: dict) -> None:
    """What every pod of a job gets: its experiment's labels (the NetworkPolicy admits only
    them), no service-account token (nothing in a pod talks to the Kubernetes API), and a
    read-only root filesystem with a writable /tmp (Ray's session files; HOME's caches)."""
    meta = template.setdefault("metadata", {})
    meta["labels"] = {**meta.get("labels", {}), **experiment_labels}
    spec = template["spec"]
    spec["automountServiceAccountToken"] = False
    spec.setdefault("volumes", []).append({"name": "tmp", "emptyDir": {}})
    for c in spec["containers"]:
        c["securityContext"]["readOnlyRootFilesystem"] = True
        c.setdefault("volumeMounts", []).append({"name": "tmp", "mountPath": "/tmp"})
        c.setdefault("env", []).append({"name": "HOME", "value": "/tmp"})


def network_policy(name: str, labels: dict, operator_namespace: str) -> dict:
    """Ingress to the job's pods only from the job's own pods (head, workers, the submitter)
    and, on the dashboard port, from the KubeRay operator, which polls the job's status."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-ray", "labels": labels},
        "spec": {
            "podSelector": {"matchLabels": labels},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": labels}}]},
                {
                    "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": operator_namespace}}}],
                    "ports": [{"protocol": "TCP", "port": 8265}],
                },
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so the embedded config stays readable."""


_Dumper.add_representer(
    str,
    lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def dump(docs: list[dict]) -> str:
    return "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=4096) for d in docs)


def render(
    config_path: str,
    overrides: list[str],
    image: str,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    memory_per_worker_gib: float = 8.0,
    pvc: str = DEFAULT_PVC,
    backoff_limit: int = 3,
    run_root: str = DEFAULT_RUN_ROOT,
    env_secret: str | None = None,
    operator_namespace: str = DEFAULT_OPERATOR_NAMESPACE,
) -> str:
    """The ConfigMap + RayJob + NetworkPolicy YAML for an experiment (raises ConfigError /
    RenderError)."""
    _check_image(image)
    if memory_per_worker_gib <= 0 or backoff_limit < 0:
        raise RenderError("--memory-per-worker must be > 0 and --backoff-limit >= 0")
    if "://" not in run_root and not run_root.startswith("/"):
        raise RenderError(
            f"--run-root {run_root!r} must be an absolute path in the pods (e.g. {DEFAULT_RUN_ROOT} on the claim) "
            "or a filesystem URL such as s3://bucket/runs"
        )
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", operator_namespace):
        raise RenderError(f"--operator-namespace {operator_namespace!r} is not a Kubernetes namespace name")
    if env_secret is not None and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", env_secret):
        raise RenderError(f"--env-secret {env_secret!r} is not a Kubernetes Secret name (lowercase letters, digits, '-', '.')")
    cfg, raw, applied = _experiment(config_path, list(overrides), workers, gpus_per_worker)
    config_text = f"# {config_path} with {' '.join(applied)}\n" + yaml.safe_dump(raw, sort_keys=False)
    config_map, rayjob, layouts = manifests(
        cfg, config_text, image, memory_per_worker_gib, pvc, backoff_limit, run_root, env_secret, config_path
    )
    header = (
        f"# Rendered by `raysim k8s render` from {config_path} for Ray {ray_version()}; re-render rather than edit.\n"
        + "".join(
            f"# {'' if len(layouts) == 1 else group + ': '}{lay.actors} worker actors on {lay.pods} pod(s) of "
            f"{lay.actors_per_pod} actor(s), {lay.gpus_per_pod} GPU(s), {lay.ray_cpus_per_pod + POD_EXTRA_CPUS} CPUs, "
            f"{lay.memory_per_pod_gib}Gi each.\n"
            for group, lay in layouts
        )
        + f"# Needs the ReadWriteMany PersistentVolumeClaim {pvc!r}; stop with `kubectl delete rayjob {rayjob['metadata']['name']}`.\n"
        f"# Run directory {run_root.rstrip('/')}/{rayjob['metadata']['name']}: a retry resumes it (--auto-resume)"
        + (f"; environment from Secret {env_secret!r}.\n" if env_secret else ".\n")
    )
    policy = network_policy(rayjob["metadata"]["name"], rayjob["metadata"]["labels"], operator_namespace)
    return header + dump([config_map, rayjob, policy])


def main(argv: list[str] | None = None) -> int:
    """`python -m raysim.deploy.k8s render ...`: the same command without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="raysim", description="Kubernetes manifests for raysim experiments.")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
