"""KubeRay manifests: every file in k8s/ and every `raysim k8s render` output is checked
against the KubeRay CRD schemas (strictly: unknown fields fail) and, for core kinds and
the pod templates inside, against Kubernetes' own schemas (kubernetes-validate, offline).
The CRDs are data beside the project (../shared/kuberay-crds, or $RAYSIM_KUBERAY_CRDS),
never copied into it."""
import copy
import os
import re
import shlex
import stat
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft7Validator
from packaging.specifiers import SpecifierSet

from raysim.deploy import k8s
from raysim.config import config_from_dict

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = Path(os.environ.get("RAYSIM_KUBERAY_CRDS", ROOT.parent / "shared" / "kuberay-crds"))
MANIFESTS = sorted((ROOT / "k8s").glob("*.yaml"))
RAY = version("ray")
FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB of YAML: 5x faster in C
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
IMAGE = f"raysim:{PYPROJECT['project']['version']}-ray{RAY}"
# The command k8s/rayjob.yaml says it was rendered with (its header repeats it).
EXAMPLE_ARGS = ["configs/quickstart.yaml", "--image", IMAGE, "--workers", "4", "--gpus-per-worker", "0.5"]
# Variants that exercise every branch of the layout: CPU only, whole GPUs, shared GPUs,
# several GPUs per actor, and overrides baked into the ConfigMap.
RENDER_VARIANTS = {
    "cpu": ["configs/quickstart.yaml", "--image", IMAGE, "--workers", "3", "--gpus-per-worker", "0"],
    "gpu1": ["configs/quickstart.yaml", "--image", IMAGE, "--workers", "16", "--gpus-per-worker", "1"],
    "gpu-half": ["configs/quickstart.yaml", "clients.total=500", "clients.per_round=50", "--image", IMAGE,
                 "--workers", "32", "--gpus-per-worker", "0.5"],
    "gpu2": ["configs/quickstart.yaml", "--image", "reg.example:5000/team/" + IMAGE, "--workers", "2",
             "--gpus-per-worker", "2"],
    "s3": ["configs/quickstart.yaml", "--image", IMAGE, "--workers", "2", "--gpus-per-worker", "1",
           "--run-root", "s3://bucket/raysim/runs/", "--env-secret", "raysim-s3"],
    # worker groups per client family: shared GPUs with a custom resource, and a CPU group
    "groups": ["configs/creamfl.yaml", "runtime.worker_groups=[{name: vision, families: [image], num_workers: 4, "
               "num_gpus: 0.5, resources: {a100: 1}}, {name: text, families: [text, image_text], num_workers: 2, "
               "num_cpus: 2}]", "--image", IMAGE],
    # one named group; the default group (with a custom resource) serves the other families
    "groups-default": ["configs/creamfl.yaml", "runtime.resources_per_worker={cpu_pool: 0.5}",
                       "runtime.worker_groups=[{name: vision, families: [image], num_gpus: 1}]", "--image", IMAGE,
                       "--workers", "3"],
}  # fmt: skip


# --------------------------------------------------------------------------- helpers


def strict(schema):
    """A copy of a CRD schema that rejects unknown fields: every object schema listing
    `properties` gets additionalProperties: false, unless it already says what extra
    keys may be or keeps unknown fields on purpose (x-kubernetes-preserve-unknown-fields)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(schema)
    return schema


def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def render(args: list[str]) -> str:
    ns = _render_parser().parse_args(["k8s", "render", *args])
    return k8s.render(
        ns.config, ns.overrides, ns.image, workers=ns.workers, gpus_per_worker=ns.gpus_per_worker,
        memory_per_worker_gib=ns.memory_per_worker, pvc=ns.pvc, backoff_limit=ns.backoff_limit,
        run_root=ns.run_root, env_secret=ns.env_secret, operator_namespace=ns.operator_namespace,
    )  # fmt: skip


def _render_parser():
    import argparse

    parser = argparse.ArgumentParser()
    k8s.add_commands(parser.add_subparsers(dest="command"))
    return parser


def cluster_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    if doc["kind"] == "RayJob":
        return [doc["spec"]["rayClusterSpec"]]
    return []


def pod_templates(doc: dict) -> list[dict]:
    out = []
    for spec in cluster_specs(doc):
        out.append(spec["headGroupSpec"]["template"])
        out += [g["template"] for g in spec.get("workerGroupSpecs", [])]
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        out.append(doc["spec"]["submitterPodTemplate"])
    return out


def all_documents() -> dict[str, list[dict]]:
    docs = {f"k8s/{p.name}": load_docs(p.read_text()) for p in MANIFESTS}
    docs.update({f"render {name}": load_docs(render(args)) for name, args in RENDER_VARIANTS.items()})
    return docs


@pytest.fixture(scope="module")
def documents():
    return all_documents()


@pytest.fixture(scope="module")
def crd_validators():
    if not CRD_DIR.is_dir():
        pytest.skip(
            f"KubeRay CRDs not found at {CRD_DIR}: set RAYSIM_KUBERAY_CRDS to the directory holding "
            "ray.io_rayclusters.yaml and ray.io_rayjobs.yaml"
        )
    validators = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=FAST_LOADER)
        if crd.get("kind") != "CustomResourceDefinition":
            continue
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        key = (f"{crd['spec']['group']}/v1", crd["spec"]["names"]["kind"])
        validators[key] = Draft7Validator(strict(v1["schema"]["openAPIV3Schema"]))
    assert {("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob")} <= set(validators)
    return validators


@pytest.fixture(scope="module")
def core_validate():
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (offline Kubernetes schemas) is not installed"
    )
    k8s_version = kv.utils.latest_version()

    def validate(doc: dict) -> None:
        kv.validate(doc, k8s_version, strict=True)

    return validate


def as_pod(template: dict) -> dict:
    metadata = dict(template.get("metadata", {}), name="template")
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template["spec"]}


def crd_errors(validators, doc) -> list[str]:
    validator = validators[(doc["apiVersion"], doc["kind"])]
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


# --------------------------------------------------------------------------- schemas


def test_strict_walker_closes_objects_but_keeps_maps_and_preserved_fields():
    schema = {
        "type": "object",
        "properties": {
            "spec": {"type": "object", "properties": {"a": {"type": "string"}}},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"x": {}}},
            "items": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "integer"}}}},
        },
    }
    v = Draft7Validator(strict(schema))
    assert v.is_valid({"spec": {"a": "x"}, "labels": {"any": "thing"}, "free": {"y": 1}, "items": [{"n": 1}]})
    assert not v.is_valid({"spec": {"a": "x", "b": 1}})
    assert not v.is_valid({"items": [{"n": 1, "m": 2}]})
    assert not v.is_valid({"other": 1})
    assert "additionalProperties" not in schema["properties"]["spec"]  # the input is untouched


def test_every_manifest_validates_against_the_kuberay_crds(documents, crd_validators):
    assert MANIFESTS, "k8s/ holds no manifests"
    kinds = set()
    for source, docs in documents.items():
        for doc in docs:
            kinds.add(doc["kind"])
            if (doc["apiVersion"], doc["kind"]) in crd_validators:
                assert crd_errors(crd_validators, doc) == [], (source, doc["kind"])
    assert kinds == {"RayCluster", "RayJob", "ConfigMap", "PersistentVolumeClaim", "NetworkPolicy"}


def test_core_kinds_and_pod_templates_validate_against_kubernetes(documents, core_validate):
    for docs in documents.values():
        for doc in docs:
            if doc["apiVersion"] == "ray.io/v1":
                for template in pod_templates(doc):
                    core_validate(as_pod(template))
            else:
                core_validate(doc)  # ConfigMap, PersistentVolumeClaim; an unknown kind raises


@pytest.mark.parametrize(
    "path",
    [
        ("spec", "bogus"),
        ("spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0, "bogus"),
        ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "bogus"),
        ("spec", "submitterPodTemplate", "spec", "bogus"),
    ],
)
def test_an_injected_unknown_field_fails(crd_validators, path):
    (rayjob,) = [d for d in load_docs(render(EXAMPLE_ARGS)) if d["kind"] == "RayJob"]
    assert crd_errors(crd_validators, rayjob) == []
    node = rayjob
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = "surprise"
    errors = crd_errors(crd_validators, rayjob)
    assert len(errors) == 1 and "'bogus' was unexpected" in errors[0]


def test_an_injected_unknown_pod_field_fails_the_kubernetes_schema(core_validate):
    (rayjob,) = [d for d in load_docs(render(EXAMPLE_ARGS)) if d["kind"] == "RayJob"]
    pod = as_pod(rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"])
    pod["spec"]["containers"][0]["resources"]["limts"] = {"cpu": "1"}
    with pytest.raises(Exception, match="limts"):
        core_validate(pod)


# --------------------------------------------------------------------------- rendering


def test_render_is_byte_identical_across_calls_and_processes():
    first, second = render(EXAMPLE_ARGS), render(EXAMPLE_ARGS)
    assert first == second
    env = dict(os.environ, PYTHONHASHSEED="12345")  # a different set/dict iteration order
    proc = subprocess.run(
        [sys.executable, "-m", "raysim.deploy.k8s", "k8s", "render", *EXAMPLE_ARGS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == first


def test_example_rayjob_is_the_rendered_quickstart():
    text = (ROOT / "k8s" / "rayjob.yaml").read_text()
    assert "raysim k8s render " + " ".join(EXAMPLE_ARGS) in text
    example = [d for d in load_docs(text) if d["kind"] != "PersistentVolumeClaim"]
    rendered = load_docs(render(EXAMPLE_ARGS))
    # The embedded config is compared as a validated config, so a new config key with a
    # default does not make the example stale; anything else must match exactly.
    ex_cfg, re_cfg = (config_from_dict(yaml.safe_load(d[0]["data"].pop("config.yaml"))) for d in (example, rendered))
    assert ex_cfg == re_cfg, "k8s/rayjob.yaml is stale: re-render it with the command in its header"
    assert example == rendered, "k8s/rayjob.yaml is stale: re-render it with the command in its header"


def test_versions_agree_ray_pin_rayversion_and_image_tags(documents):
    pins = [d for d in PYPROJECT["project"]["dependencies"] if re.match(r"ray(\[.*\])?==", d)]
    assert len(pins) == 1
    assert RAY in SpecifierSet(pins[0].split("]", 1)[-1].removeprefix("ray"))
    for source, docs in documents.items():
        for doc in docs:
            for spec in cluster_specs(doc):
                assert spec["rayVersion"] == RAY, source
            for template in pod_templates(doc):
                for c in template["spec"]["containers"]:
                    assert c["image"].endswith(f":{PYPROJECT['project']['version']}-ray{RAY}"), (source, c["image"])


def test_an_image_built_for_another_ray_is_refused(capsys):
    rc = k8s.main(["k8s", "render", "configs/quickstart.yaml", "--image", "raysim:0.1.0-ray2.59.1"])
    assert rc == 2
    assert f"built for Ray 2.59.1, but this raysim pins Ray {RAY}" in capsys.readouterr().err


def test_bad_render_input_exits_2_with_one_message(capsys, tmp_path):
    cases = [
        (["configs/quickstart.yaml", "clients.total=0"], "clients.total"),
        (["configs/quickstart.yaml", "runtime.num_workers=0"], "--workers must be at least 1"),
        (["configs/nope.yaml"], "configs/nope.yaml does not exist"),
        (["configs/quickstart.yaml", "--gpus-per-worker", "-1"], "--gpus-per-worker must be >= 0"),
        (["configs/quickstart.yaml", "--run-root", "runs"], "--run-root 'runs' must be an absolute path"),
        (["configs/quickstart.yaml", "--env-secret", "My_Secret"], "--env-secret 'My_Secret' is not a Kubernetes Secret"),
    ]
    for args, needle in cases:
        assert k8s.main(["k8s", "render", *args, "--image", IMAGE]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
    out = tmp_path / "job.yaml"
    assert k8s.main(["k8s", "render", *EXAMPLE_ARGS, "--out", str(out)]) == 0
    assert out.read_text() == render(EXAMPLE_ARGS)


def _rayjob(args):
    docs = load_docs(render(args))
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    return yaml.safe_load(cm["data"]["config.yaml"]), job


def test_gpu_workers_get_gpu_limits_and_the_pool_fits_the_pods():
    cfg, job = _rayjob(RENDER_VARIANTS["gpu1"])
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 16
    assert group["rayStartParams"] == {"num-cpus": "1"}  # one actor of num_cpus_per_worker=1 per pod
    assert {"num_workers": 16, "num_gpus_per_worker": 1.0, "device": "auto", "ray_address": "auto"}.items() <= cfg["runtime"].items()
    assert "nvidia.com/gpu" not in str(job["spec"]["rayClusterSpec"]["headGroupSpec"])

    cfg, job = _rayjob(RENDER_VARIANTS["gpu-half"])  # 500 clients, 32 actors on 16 GPUs
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 16 and group["rayStartParams"] == {"num-cpus": "2"}
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert cfg["clients"] == {"total": 500, "per_round": 50}

    _, job = _rayjob(RENDER_VARIANTS["gpu2"])
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 2
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"

    cfg, job = _rayjob(RENDER_VARIANTS["cpu"])
    assert "nvidia.com/gpu" not in yaml.safe_dump(job)
    assert cfg["runtime"]["device"] == "cpu"
    assert job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"] == "cpu-workers"


def test_worker_groups_render_one_group_spec_each_with_gpus_and_custom_resources():
    from ray.autoscaler._private.kuberay.autoscaling_config import _get_ray_resources_from_group_spec

    cfg, job = _rayjob(RENDER_VARIANTS["groups"])
    vision, text = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]  # every family has a group: no default group
    assert (vision["groupName"], text["groupName"]) == ("vision-workers", "text-workers")
    # 4 actors at 0.5 GPU: 2 per 1-GPU pod; the pod advertises the custom resource of both actors
    assert vision["replicas"] == vision["minReplicas"] == vision["maxReplicas"] == 2
    limits = vision["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and limits["cpu"] == "3"
    assert vision["rayStartParams"] == {"num-cpus": "2", "resources": '"{\\"a100\\": 2}"'}
    assert vision["template"]["metadata"]["labels"]["raysim/worker-group"] == "vision"
    # 2 CPU-only actors of 2 CPUs: one per pod, no GPU, no custom resource
    assert text["replicas"] == 2 and text["rayStartParams"] == {"num-cpus": "2"}
    assert "nvidia.com/gpu" not in str(text) and "tolerations" not in text["template"]["spec"]
    # what Ray's autoscaler reads from each group: the resources the actors ask for
    got = _get_ray_resources_from_group_spec(vision, is_head=False)
    assert {k: got[k] for k in ("CPU", "GPU", "a100")} == {"CPU": 2, "GPU": 1, "a100": 2}
    got = _get_ray_resources_from_group_spec(text, is_head=False)
    assert got["CPU"] == 2 and got.get("GPU", 0) == 0
    assert cfg["runtime"]["device"] == "auto" and cfg["runtime"]["worker_groups"][0]["num_gpus"] == 0.5

    cfg, job = _rayjob(RENDER_VARIANTS["groups-default"])
    vision, default = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (vision["groupName"], default["groupName"]) == ("vision-workers", "default-workers")
    assert vision["replicas"] == 1 and vision["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # --workers sizes the default group; its custom resource (0.5 per actor) rounds up per pod
    assert default["replicas"] == 3 and default["rayStartParams"] == {"num-cpus": "1", "resources": '"{\\"cpu_pool\\": 1}"'}
    assert _get_ray_resources_from_group_spec(default, is_head=False)["cpu_pool"] == 1


def test_dedicated_worker_groups_get_one_actor_per_client_of_their_families():
    args = ["configs/creamfl.yaml", "runtime.placement=dedicated",
            "runtime.worker_groups=[{name: vision, families: [image], num_gpus: 1}]", "--image", IMAGE]  # fmt: skip
    _, job = _rayjob(args)
    vision, default = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    # creamfl.yaml: 20 clients, kinds 0.35 / 0.35 / 0.3 -> 7 image-only, 13 others
    assert vision["replicas"] == 7 and default["replicas"] == 13
    assert "# vision-workers: 7 worker actors on 7 pod(s)" in render(args)


def test_a_worker_group_with_an_unknown_family_is_a_render_error(capsys):
    bad = "runtime.worker_groups=[{name: vision, families: [picture]}]"
    assert k8s.main(["k8s", "render", "configs/creamfl.yaml", bad, "--image", IMAGE]) == 2
    err = capsys.readouterr().err
    assert "runtime.worker_groups[0].families: 'picture' is not a client family of algorithm creamfl" in err
    assert "configs/creamfl.yaml" in err and "Traceback" not in err


def test_pods_run_as_non_root_with_requests_and_limits(documents):
    for source, docs in documents.items():
        for doc in docs:
            for template in pod_templates(doc):
                pod_ctx = template["spec"]["securityContext"]
                assert pod_ctx["runAsNonRoot"] is True and pod_ctx["runAsUser"] == k8s.UID != 0, source
                for c in template["spec"]["containers"]:
                    res = c["resources"]
                    assert {"cpu", "memory"} <= set(res["requests"]) and res["requests"] == res["limits"], source
                    assert c["securityContext"]["allowPrivilegeEscalation"] is False, source
                    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], source
            for spec in cluster_specs(doc):
                if spec.get("enableInTreeAutoscaling"):
                    auto = spec["autoscalerOptions"]
                    assert auto["resources"]["requests"] == auto["resources"]["limits"], source
                    assert auto["securityContext"]["allowPrivilegeEscalation"] is False, source


def test_nothing_is_exposed_beyond_the_cluster(documents):
    for source, docs in documents.items():
        for doc in docs:
            for spec in cluster_specs(doc):
                head = spec["headGroupSpec"]
                assert head["serviceType"] == "ClusterIP" and not head.get("enableIngress"), source
                # stated explicitly (the pod's interfaces, for the operator), not left to a default
                assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0", source
                assert head["rayStartParams"]["num-cpus"] == "0", source


def test_storage_claim_is_shared_and_identical_in_both_files():
    claims = [
        [d for d in load_docs(p.read_text()) if d["kind"] == "PersistentVolumeClaim"] for p in MANIFESTS
    ]
    assert all(len(c) == 1 for c in claims) and len(claims) == 2
    assert claims[0] == claims[1]
    assert claims[0][0]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claims[0][0]["metadata"]["name"] == k8s.DEFAULT_PVC


def test_config_is_mounted_on_the_head_and_the_run_dir_is_on_the_claim():
    cfg, job = _rayjob(EXAMPLE_ARGS)
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (config_vol,) = [v for v in head["volumes"] if "configMap" in v]
    assert config_vol["configMap"]["name"] == "raysim-quickstart-config"
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert mounts[config_vol["name"]] == "/config" and mounts["storage"] == "/storage"
    assert job["spec"]["backoffLimit"] == 3
    assert "--out /storage/runs/raysim-quickstart" in job["spec"]["entrypoint"]
    assert cfg["name"] == "quickstart" and cfg["runtime"]["num_workers"] == 4


def test_entrypoint_passes_auto_resume_through_the_submitter_and_job_shells(tmp_path):
    """Replays the path of the entrypoint: KubeRay's submitter runs it inside
    `bash -c "... ray job submit ... -- ENTRYPOINT ;"`, `ray job submit` re-quotes the
    words it received (shlex.join), and the job runs that with a shell. A stub `raysim`
    records the arguments it gets. Whether to resume is raysim's decision (`--auto-resume`,
    tests/test_storage.py), for a path on the claim and for a URL alike."""
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    stub = stub_dir / "raysim"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$*" > "$RECORD"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)

    def run_as_the_job(command):
        assert "$(" not in command  # kubelet would try to expand $(VAR) in container args
        words = subprocess.run(
            ["bash", "-c", f"printf '%s\\0' {command}"], capture_output=True, text=True, check=True
        ).stdout.split("\0")[:-1]
        record = tmp_path / "record"
        env = dict(os.environ, PATH=f"{stub_dir}{os.pathsep}{os.environ['PATH']}", RECORD=str(record))
        subprocess.run(shlex.join(words), shell=True, env=env, check=True)
        return record.read_text().strip()

    for run_dir in (str(tmp_path / "runs" / "exp"), "s3://bucket/raysim/runs/exp"):
        assert run_as_the_job(k8s.entrypoint(run_dir)) == f"run /config/config.yaml --out {run_dir} --auto-resume"


def test_s3_run_root_puts_the_run_at_the_url_with_credentials_from_a_secret():
    _, job = _rayjob(RENDER_VARIANTS["s3"])
    assert job["spec"]["entrypoint"] == (
        "raysim run /config/config.yaml --out s3://bucket/raysim/runs/raysim-quickstart --auto-resume"
    )
    spec = job["spec"]["rayClusterSpec"]
    for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        # the driver uploads checkpoints; the workers write their clients' state
        assert template["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "raysim-s3"}}]
    _, plain = _rayjob(EXAMPLE_ARGS)
    assert "envFrom" not in yaml.safe_dump(plain)


# --------------------------------------------------------------------------- image


def test_dockerfile_installs_the_pinned_torch_and_the_project_like_ci():
    text = (ROOT / "Dockerfile").read_text()
    pin = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert f"ARG TORCH_VERSION={pin}" in text
    assert "pip install -c constraints.txt ." in text  # the Makefile's install, minus -e/[test]
    assert "install -q -c constraints.txt -e '.[test]'" in (ROOT / "Makefile").read_text()
    assert re.search(r"^USER 1000:1000$", text, re.M) and k8s.UID == 1000
    assert f"ray{RAY}" in text  # the documented tag


def test_the_job_is_closed_to_other_pods_and_runs_without_a_token_or_a_writable_root():
    """Only the job's own pods (and the operator, on the dashboard port) reach its Ray; Ray
    asks for its token; no pod holds a service-account token or writes its root filesystem."""
    docs = load_docs(render(EXAMPLE_ARGS))
    (job,) = [d for d in docs if d["kind"] == "RayJob"]
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    labels = job["metadata"]["labels"]
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert policy["spec"]["podSelector"] == {"matchLabels": labels} and policy["spec"]["policyTypes"] == ["Ingress"]
    own, operator = policy["spec"]["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": labels}}]}
    assert operator["ports"] == [{"protocol": "TCP", "port": 8265}]
    assert operator["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}}]
    templates = list(pod_templates(job))
    assert len(templates) == 3  # head, the workers, the submitter
    for template in templates:
        assert labels.items() <= template["metadata"]["labels"].items()  # what the policy admits
        spec = template["spec"]
        assert spec["automountServiceAccountToken"] is False
        assert {"name": "tmp", "emptyDir": {}} in spec["volumes"]
        for c in spec["containers"]:
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    other = load_docs(render([*EXAMPLE_ARGS, "--operator-namespace", "ray-ops"]))
    (policy,) = [d for d in other if d["kind"] == "NetworkPolicy"]
    assert policy["spec"]["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] == "ray-ops"
