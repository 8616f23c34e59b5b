"""Every YAML under clusters/ is a config Ray or KubeRay would accept, and none opens a cluster up.

Cluster-launcher YAMLs go through Ray's own path (`ray up`): the JSON schema Ray ships, then
`prepare_config` + `validate_config`. KubeRay manifests are checked against an explicit list of
the ray.io/v1 fields of the KubeRay version they target (v1.6). Job commands in the manifests
and in docs/operations.md must name config keys the jobs accept. Each checker is also run on a
broken copy, so every test here can fail.
"""

from __future__ import annotations

import ast
import copy
import importlib
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
DOCS = REPO / "docs" / "operations.md"


def yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTERS.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def documents() -> list[tuple[Path, dict]]:
    docs = []
    for path in yaml_files():
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def kind_of(doc: dict) -> str:
    if str(doc.get("apiVersion", "")).startswith("ray.io/"):
        return "kuberay"
    if "apiVersion" in doc and "kind" in doc:
        return "kubernetes"
    if "provider" in doc and "cluster_name" in doc:
        return "launcher"
    return "unknown"


def docs_of(kind: str) -> list:
    return [pytest.param(d, id=str(p.relative_to(REPO))) for p, d in documents() if kind_of(d) == kind]


def text_files() -> list[Path]:
    return sorted(p for p in CLUSTERS.rglob("*") if p.is_file())


def test_every_yaml_under_clusters_parses_as_a_known_kind():
    assert any(kind_of(d) == "launcher" for _, d in documents()), "no cluster-launcher YAML under clusters/"
    assert any(kind_of(d) == "kuberay" for _, d in documents()), "no KubeRay manifest under clusters/"
    unknown = [str(p.relative_to(REPO)) for p, d in documents() if kind_of(d) == "unknown"]
    assert not unknown, f"YAML that is neither a launcher config nor a Kubernetes object: {unknown}"


def test_yaml_that_is_neither_launcher_config_nor_kubernetes_object_is_unknown():
    assert kind_of({"cluster_name": "x", "max_workers": 2}) == "unknown"
    assert kind_of({"apiVersion": "v1", "kind": "ConfigMap"}) == "kubernetes"


# --- cluster launcher ---------------------------------------------------------------------


def ray_validate(config: dict) -> dict:
    """What `ray up` does before touching a cloud: schema, defaults, then Ray's own checks."""
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def launcher_problems(cfg: dict) -> list[str]:
    """reidscale's rules for a launcher config: CPU head, GPU workers, limits, token auth, loopback."""
    problems = []
    types = cfg.get("available_node_types", {})
    head = types.get(cfg.get("head_node_type"), {})
    if head.get("resources", {}).get("GPU", 0):
        problems.append("the head node type has GPUs; it should be a CPU coordinator")
    workers = {name: t for name, t in types.items() if name != cfg.get("head_node_type")}
    if not any(t.get("resources", {}).get("GPU", 0) >= 1 for t in workers.values()):
        problems.append("no worker node type declares GPU resources")
    for name, t in workers.items():
        if "max_workers" not in t or t.get("min_workers", 0) > t["max_workers"]:
            problems.append(f"{name}: needs max_workers >= min_workers")
    for key in ("max_workers", "idle_timeout_minutes"):
        if key not in cfg:
            problems.append(f"{key} is not set: autoscaling limits must be explicit")
    head_start = " ".join(cfg.get("head_start_ray_commands", []))
    worker_start = " ".join(cfg.get("worker_start_ray_commands", []))
    if not re.search(r"--dashboard-host[= ](127\.0\.0\.1|localhost)\b", head_start):
        problems.append("head_start_ray_commands must bind the dashboard to 127.0.0.1")
    for name, cmd in (("head", head_start), ("worker", worker_start)):
        if "RAY_AUTH_MODE=token" not in cmd:
            problems.append(f"{name}_start_ray_commands must start Ray with RAY_AUTH_MODE=token")
    mounts = cfg.get("file_mounts", {})
    if not any(remote.endswith(".ray/auth_token") for remote in mounts):
        problems.append("file_mounts must copy ~/.ray/auth_token to the nodes")
    if any(local.rstrip("/") in (".", "") for local in mounts.values()):
        problems.append("file_mounts must not sync the whole checkout (.venv, runs)")
    if ".gitignore" not in cfg.get("rsync_filter", []):
        problems.append("rsync_filter must include .gitignore")
    worker_setup = " ".join(cfg.get("setup_commands", []) + cfg.get("worker_setup_commands", []))
    baked = not str(cfg.get("docker", {}).get("image", "rayproject/")).startswith("rayproject/")
    if "[gpu]" not in worker_setup and not baked:
        problems.append("GPU workers must install the project with its gpu extra (or use a baked image)")
    return problems


@pytest.mark.parametrize("cfg", docs_of("launcher"))
def test_launcher_config_passes_rays_schema_and_validation(cfg):
    prepared = ray_validate(cfg)
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("cfg", docs_of("launcher"))
def test_launcher_config_has_cpu_head_gpu_workers_token_auth_and_loopback_dashboard(cfg):
    assert launcher_problems(cfg) == []


def _base_launcher() -> dict:
    return copy.deepcopy(next(d for _, d in documents() if kind_of(d) == "launcher"))


def test_launcher_validation_rejects_broken_copies(tmp_path):
    broken = _base_launcher()
    broken["max_wrokers"] = 4  # typo: Ray's schema forbids unknown top-level keys
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(yaml.safe_load(path.read_text()))

    broken = _base_launcher()
    broken["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError, match="head_node_type"):
        ray_validate(broken)

    broken = _base_launcher()
    gpu_type = next(n for n, t in broken["available_node_types"].items() if t["resources"].get("GPU"))
    broken["available_node_types"][gpu_type]["min_workers"] = broken["max_workers"] + 1
    with pytest.raises(ValueError, match="max_workers"):
        ray_validate(broken)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda c: c.update(head_start_ray_commands=[" ".join(c["head_start_ray_commands"]).replace(
            "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")]), "127.0.0.1"),
        (lambda c: c.update(worker_start_ray_commands=["ray start --address=$RAY_HEAD_IP:6379"]), "RAY_AUTH_MODE"),
        (lambda c: [t["resources"].pop("GPU", None) for t in c["available_node_types"].values()], "GPU"),
        (lambda c: c["file_mounts"].update({"~/reidscale": "."}), "whole checkout"),
        (lambda c: c.pop("idle_timeout_minutes"), "idle_timeout_minutes"),
        (lambda c: c.update(worker_setup_commands=["pip install -e ."], setup_commands=[]), "gpu extra"),
    ],
    ids=["public-dashboard", "no-token-auth", "no-gpus", "sync-checkout", "no-idle-timeout", "no-gpu-extra"],
)
def test_launcher_policy_rejects_broken_copies(mutate, expected):
    broken = _base_launcher()
    mutate(broken)
    assert any(expected in p for p in launcher_problems(broken)), launcher_problems(broken)


# --- KubeRay ------------------------------------------------------------------------------

# ray.io/v1 fields of the KubeRay v1.6 CRDs (ray.io_rayclusters.yaml, ray.io_rayjobs.yaml).
RAYCLUSTER_SPEC = {"authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                   "headGroupSpec", "headServiceAnnotations", "managedBy", "rayVersion", "suspend",
                   "upgradeStrategy", "workerGroupSpecs"}
HEAD_GROUP = {"enableIngress", "headService", "labels", "rayStartParams", "resources", "serviceType", "template"}
WORKER_GROUP = {"groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts",
                "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template"}
AUTH_OPTIONS = {"mode", "secretName", "enableK8sTokenAuth"}
AUTOSCALER_OPTIONS = {"env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy", "resources",
                      "securityContext", "upscalingMode", "version", "volumeMounts"}
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
               "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
               "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes",
               "submissionMode", "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|_KEY$", re.I)


def _unknown(section: dict, allowed: set[str], where: str) -> list[str]:
    extra = sorted(set(section) - allowed)
    return [f"{where}: unknown field(s) {extra}"] if extra else []


def _containers(group: dict) -> list[dict]:
    return group.get("template", {}).get("spec", {}).get("containers", [])


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", str(text))[:3])


def group_problems(group: dict, where: str, claims: set[str], *, head: bool) -> list[str]:
    """One head or worker group: replicas, image, resources, GPUs, secrets, volumes."""
    problems = [] if head else _unknown(group, WORKER_GROUP, where)
    if not head:
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        n = group.get("replicas", lo)
        if not isinstance(lo, int) or not isinstance(hi, int) or not 0 <= lo <= hi:
            problems.append(f"{where}: needs 0 <= minReplicas <= maxReplicas, got {lo}, {hi}")
        elif not isinstance(n, int) or not lo <= n <= hi:
            problems.append(f"{where}: replicas {n} outside [{lo}, {hi}]")
    if not all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()):
        problems.append(f"{where}: rayStartParams values must be strings")
    if not _containers(group):
        problems.append(f"{where}: no containers")
    for c in _containers(group):
        image = c.get("image", "")
        if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
            problems.append(f"{where}: image {image!r} needs a fixed tag")
        limits = c.get("resources", {}).get("limits", {})
        requests = c.get("resources", {}).get("requests", {})
        if "cpu" not in limits or "memory" not in limits:
            problems.append(f"{where}: set cpu and memory limits (KubeRay derives Ray's resources from them)")
        gpus = limits.get("nvidia.com/gpu")
        if head and gpus:
            problems.append(f"{where}: the head should not hold GPUs")
        if gpus and str(requests.get("nvidia.com/gpu", gpus)) != str(gpus):
            problems.append(f"{where}: GPU requests must equal limits")
        for env in c.get("env", []):
            if SECRET_NAME.search(env.get("name", "")) and "value" in env:
                problems.append(f"{where}: env {env['name']} has a literal value; use valueFrom.secretKeyRef")
    for vol in group.get("template", {}).get("spec", {}).get("volumes", []):
        claim = vol.get("persistentVolumeClaim", {}).get("claimName")
        if claim and claim not in claims:
            problems.append(f"{where}: volume claim {claim!r} is not defined under clusters/kuberay")
    return problems


def cluster_spec_problems(spec: dict, where: str, claims: set[str]) -> list[str]:
    """A RayClusterSpec (of a RayCluster or a RayJob): known fields, token auth, CPU head, GPU workers."""
    problems = _unknown(spec, RAYCLUSTER_SPEC, where)
    problems += _unknown(spec.get("authOptions", {}), AUTH_OPTIONS, f"{where}.authOptions")
    problems += _unknown(spec.get("autoscalerOptions", {}), AUTOSCALER_OPTIONS, f"{where}.autoscalerOptions")
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append(f"{where}: authOptions.mode must be token")
    if _version(spec.get("rayVersion", "")) < (2, 52):
        problems.append(f"{where}: rayVersion must be set and >= 2.52.0 for token auth")
    head = spec.get("headGroupSpec", {})
    problems += _unknown(head, HEAD_GROUP, f"{where}.headGroupSpec")
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append(f"{where}: head serviceType {head['serviceType']} exposes the dashboard; use ClusterIP")
    problems += group_problems(head, f"{where}.headGroupSpec", claims, head=True)
    workers = spec.get("workerGroupSpecs", [])
    for g in workers:
        problems += group_problems(g, f"{where}.{g.get('groupName', '?')}", claims, head=False)
    if not any(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu") for g in workers for c in _containers(g)):
        problems.append(f"{where}: no worker group requests nvidia.com/gpu")
    images = {c.get("image") for g in [head, *workers] for c in _containers(g)}
    if len(images) > 1:
        problems.append(f"{where}: head and workers run different images {sorted(images, key=str)}")
    return problems


def repo_path(path: str) -> Path | None:
    """Map an in-image path such as /home/ray/reidscale/jobs/x.py to this checkout."""
    m = re.search(r"(?:^|/)((?:jobs|configs)/[^/].*)$", path)
    return REPO / m.group(1) if m else None


def split_job_command(command: str) -> tuple[Path, Path | None, list[str]]:
    """`python <script> [--config FILE] [key=value ...]` → (script, config file, overrides)."""
    args = shlex.split(command)
    i = next(i for i, a in enumerate(args) if a.endswith(".py"))
    script, rest = repo_path(args[i]), args[i + 1 :]
    config, overrides = None, []
    while rest:
        arg = rest.pop(0)
        if arg in ("--config", "-c"):
            config = repo_path(rest.pop(0))
        elif arg.startswith("--config="):
            config = repo_path(arg.split("=", 1)[1])
        else:
            overrides.append(arg)
    return script, config, overrides


def rayjob_problems(doc: dict, clusters: set[str], claims: set[str]) -> list[str]:
    spec = doc.get("spec", {})
    problems = _unknown(spec, RAYJOB_SPEC, "spec")
    entry = spec.get("entrypoint", "")
    script = repo_path(next((a for a in shlex.split(entry) if a.endswith(".py")), "")) if entry else None
    if script is None or not script.is_file():
        problems.append(f"entrypoint {entry!r} does not run a file in jobs/ of this repository")
    if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
        problems.append(f"submissionMode {spec['submissionMode']!r} is not one of {sorted(SUBMISSION_MODES)}")
    selector = spec.get("clusterSelector")
    if bool(selector) == ("rayClusterSpec" in spec):
        problems.append("set exactly one of rayClusterSpec and clusterSelector")
    if selector:
        if selector.get("ray.io/cluster") not in clusters:
            problems.append(f"clusterSelector {selector} names no RayCluster under clusters/kuberay")
        if "backoffLimit" in spec:
            problems.append("backoffLimit is incompatible with clusterSelector")
    if "rayClusterSpec" in spec:
        problems += cluster_spec_problems(spec["rayClusterSpec"], "spec.rayClusterSpec", claims)
    ttl = spec.get("ttlSecondsAfterFinished")
    if ttl is not None and (ttl < 0 or not spec.get("shutdownAfterJobFinishes")):
        problems.append("ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true and must be >= 0")
    if spec.get("activeDeadlineSeconds", 1) <= 0:
        problems.append("activeDeadlineSeconds must be positive")
    return problems


def kuberay_problems(doc: dict, clusters: set[str], claims: set[str]) -> list[str]:
    problems = _unknown(doc, {"apiVersion", "kind", "metadata", "spec"}, "top level")
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion {doc.get('apiVersion')!r}: use ray.io/v1")
    name, kind = doc.get("metadata", {}).get("name", ""), doc.get("kind")
    max_len = {"RayCluster": 53, "RayJob": 47}.get(kind)
    if max_len is None:
        return problems + [f"kind {kind!r} is not RayCluster or RayJob"]
    if not DNS1035.match(name) or len(name) > max_len:
        problems.append(f"metadata.name {name!r} must be a DNS-1035 label of at most {max_len} characters")
    if kind == "RayCluster":
        return problems + cluster_spec_problems(doc.get("spec", {}), "spec", claims)
    return problems + rayjob_problems(doc, clusters, claims)


def defined_names() -> tuple[set[str], set[str]]:
    docs = [d for _, d in documents()]
    clusters = {d["metadata"]["name"] for d in docs if d.get("kind") == "RayCluster"}
    claims = {d["metadata"]["name"] for d in docs if d.get("kind") == "PersistentVolumeClaim"}
    return clusters, claims


@pytest.mark.parametrize("doc", docs_of("kuberay"))
def test_kuberay_manifest_uses_known_fields_gpu_workers_and_token_auth(doc):
    assert kuberay_problems(doc, *defined_names()) == []


@pytest.mark.parametrize("doc", docs_of("kubernetes"))
def test_other_kubernetes_objects_are_named(doc):
    assert doc["apiVersion"] and doc["kind"] and DNS1035.match(doc.get("metadata", {}).get("name", ""))


def _base(kind: str) -> dict:
    """A copy of the first manifest of ``kind``: RayCluster, RayJob (own cluster) or RayJob+selector."""
    kind, _, variant = kind.partition("+")
    return copy.deepcopy(next(d for _, d in documents() if d.get("kind") == kind
                              and (variant == "selector") == bool(d.get("spec", {}).get("clusterSelector"))))


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"].get("rayClusterSpec", doc["spec"])


def _head(doc: dict) -> dict:
    return _containers(_cluster_spec(doc)["headGroupSpec"])[0]


@pytest.mark.parametrize(
    "kind, mutate, expected",
    [
        ("RayCluster", lambda d: d["spec"].update(workerGroupSpec=[]), "unknown field"),
        ("RayCluster", lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplicas=5, maxReplicas=2), "minReplicas"),
        ("RayCluster", lambda d: d["spec"].pop("authOptions"), "authOptions.mode"),
        ("RayCluster", lambda d: d["spec"]["headGroupSpec"].update(serviceType="LoadBalancer"), "ClusterIP"),
        ("RayCluster", lambda d: [c["resources"]["limits"].pop("nvidia.com/gpu") for g in d["spec"]["workerGroupSpecs"]
                                  for c in _containers(g)], "nvidia.com/gpu"),
        ("RayCluster", lambda d: _head(d).update(image="rayproject/ray:latest"), "tag"),
        ("RayCluster", lambda d: _head(d)["resources"]["limits"].update({"nvidia.com/gpu": "1"}), "head should not"),
        ("RayCluster", lambda d: _head(d).setdefault("env", []).append(
            {"name": "MLFLOW_TRACKING_PASSWORD", "value": "hunter2"}), "literal value"),
        ("RayCluster", lambda d: d.update(apiVersion="ray.io/v1alpha1"), "ray.io/v1"),
        ("RayJob", lambda d: d["spec"].update(entrypoint="python jobs/no_such_job.py"), "entrypoint"),
        ("RayJob", lambda d: d["spec"].update(clusterSelector={"ray.io/cluster": "reidscale"}), "exactly one"),
        ("RayJob+selector", lambda d: d["spec"].pop("clusterSelector"), "exactly one"),
        ("RayJob+selector", lambda d: d["spec"].update(clusterSelector={"ray.io/cluster": "other"}), "names no"),
        ("RayJob", lambda d: d["spec"].update(submissionMode="ShellMode"), "submissionMode"),
        ("RayJob", lambda d: d["metadata"].update(name="Train_Job"), "DNS-1035"),
        ("RayJob", lambda d: _cluster_spec(d).update(rayVersion="2.40.0"), "rayVersion"),
    ],
)
def test_kuberay_checks_reject_broken_copies(kind, mutate, expected):
    broken = _base(kind)
    mutate(broken)
    problems = kuberay_problems(broken, *defined_names())
    assert any(expected in p for p in problems), problems


# --- job commands name real config keys ---------------------------------------------------


def job_config_class(script: Path) -> type:
    """The dataclass a jobs/*.py passes to run_job(ConfigClass, fn)."""
    tree = ast.parse(script.read_text())
    origin = {a.asname or a.name: node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
              for a in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "run_job" and node.args:
            name = node.args[0].id
            return getattr(importlib.import_module(origin[name]), name)
    raise AssertionError(f"{script}: no run_job(ConfigClass, fn) call")


def check_job_command(command: str) -> None:
    """Raise if the script or --config file is missing or a key=value is not accepted by the job."""
    from reidscale.config import load_config

    script, config, overrides = split_job_command(command)
    assert script is not None and script.is_file(), f"{command!r}: no such job in jobs/"
    assert config is None or config.is_file(), f"{command!r}: no such config file {config}"
    load_config(job_config_class(script), config, overrides)


def documented_commands() -> list[str]:
    """`python jobs/... key=value` commands in the fenced blocks of docs/operations.md."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", DOCS.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            m = re.search(r"\bpython (\S*jobs/\S+\.py.*)", line.split(" #")[0])
            if m:
                commands.append("python " + m.group(1).strip())
    return commands


def job_commands() -> list:
    commands = [(str(p.relative_to(REPO)), d["spec"]["entrypoint"])
                for p, d in documents() if d.get("kind") == "RayJob"]
    commands += [("docs/operations.md", c) for c in documented_commands()]
    return [pytest.param(c, id=f"{where}:{' '.join(c.split()[:2])}:{i}") for i, (where, c) in enumerate(commands)]


def test_manifests_and_docs_show_job_commands():
    assert len(job_commands()) >= 6


@pytest.mark.parametrize("command", job_commands())
def test_job_command_in_manifests_and_docs_uses_a_real_script_and_config_keys(command):
    check_job_command(command)


def test_job_command_check_rejects_unknown_keys_and_missing_files():
    from reidscale.config import ConfigError

    with pytest.raises(ConfigError, match="num_wrokers"):
        check_job_command("python jobs/train_clipreid.py train.num_wrokers=4")
    with pytest.raises(AssertionError, match="no such job"):
        check_job_command("python jobs/train_everything.py run_dir=/tmp/x")
    with pytest.raises(AssertionError, match="no such config"):
        check_job_command("python jobs/train_clipreid.py --config configs/missing.yaml")


# --- nothing public, nothing secret -------------------------------------------------------

PUBLIC_BIND = re.compile(r"(dashboard[-_]host|--host)[\"']?\s*[=:\s]\s*[\"']?0\.0\.0\.0")
CREDENTIALS = [
    re.compile(r"aws_secret_access_key", re.I),
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"\"private_key\"\s*:"),
    re.compile(r"(?i)(password|passwd|secret|token)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9_\-+/=]{20,}"),
]


def public_bind_problems(text: str) -> list[str]:
    """Lines binding a dashboard/server to 0.0.0.0 without an `opt-in` comment on or above them."""
    lines = text.splitlines()
    return [f"line {i + 1}: {line.strip()}" for i, line in enumerate(lines) if PUBLIC_BIND.search(line)
            and not any("opt-in" in lines[j].lower() for j in range(max(0, i - 2), i + 1))]


def credential_problems(text: str) -> list[str]:
    return [f"line {text[: m.start()].count(chr(10)) + 1}: matches {p.pattern!r}"
            for p in CREDENTIALS for m in p.finditer(text)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        return None


def test_no_file_under_clusters_binds_a_dashboard_to_all_interfaces_unless_opted_in():
    found = {str(p.relative_to(REPO)): public_bind_problems(t) for p in text_files() if (t := _read(p))}
    assert {k: v for k, v in found.items() if v} == {}


def test_no_credentials_under_clusters():
    found = {str(p.relative_to(REPO)): credential_problems(t) for p in text_files() if (t := _read(p))}
    assert {k: v for k, v in found.items() if v} == {}


def test_exposure_and_credential_scans_catch_planted_lines(tmp_path):
    planted = {
        "start.sh": "ray start --head --dashboard-host=0.0.0.0\n",
        "cluster.yaml": "rayStartParams:\n  dashboard-host: '0.0.0.0'\n",
        "mlflow.sh": "mlflow server --host 0.0.0.0\n",
    }
    for name, text in planted.items():
        (tmp_path / name).write_text(text)
        assert public_bind_problems((tmp_path / name).read_text()), name
    assert public_bind_problems("# opt-in: behind the VPN's TLS proxy\nray start --dashboard-host=0.0.0.0\n") == []

    secrets = [
        "aws_secret_access_key = abc\n",
        "key: AKIA" + "ABCDEFGHIJKLMNOP\n",
        "-----BEGIN " + "RSA PRIVATE KEY-----\nMIIE...\n",
        '{"type": "service_account", "private_key": "..."}\n',
        "RAY_AUTH_TOKEN=" + "0123456789abcdef0123456789abcdef\n",
    ]
    for text in secrets:
        (tmp_path / "leak.yaml").write_text(text)
        assert credential_problems((tmp_path / "leak.yaml").read_text()), text
    assert credential_problems('"~/.ray/auth_token": "~/.ray/auth_token"\nsecretName: reidscale-token\n') == []


# --- the local head: loopback, and stop only what start.sh started -------------------------

RAY_STOP = re.compile(r"^\s*[^#\n]*\bray\s+stop\b", re.M)


def local_script_problems(start: str, stop: str) -> list[str]:
    """clusters/local/*.sh: loopback node IP and dashboard, token auth, no `ray stop`."""
    problems = []
    for name, text in (("start.sh", start), ("stop.sh", stop)):
        if RAY_STOP.search(text):
            problems.append(f"{name} runs `ray stop`, which ends every Ray process of the user")
    # without it Ray turns --node-ip-address=127.0.0.1 back into the machine's address
    if not re.search(r"^\s*export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0\s*$", start, re.M):
        problems.append("start.sh must export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (loopback node IP)")
    for flag in ("--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--dashboard-agent-listen-port="):
        if flag not in start:
            problems.append(f"start.sh must pass {flag}")
    if "REIDSCALE_RAY_OWNER" not in start or "REIDSCALE_RAY_OWNER" not in stop:
        problems.append("start.sh must tag its head (REIDSCALE_RAY_OWNER) and stop.sh stop by that tag")
    return problems


def _local_scripts() -> tuple[str, str]:
    return (CLUSTERS / "local" / "start.sh").read_text(), (CLUSTERS / "local" / "stop.sh").read_text()


def test_local_scripts_bind_loopback_and_never_run_ray_stop():
    assert local_script_problems(*_local_scripts()) == []


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda a, b: (a, b.replace("set -euo pipefail", "set -euo pipefail\nray stop --force")), "ray stop"),
        (lambda a, b: (a + "\nRAY_ADDRESS=auto ray stop\n", b), "ray stop"),
        (lambda a, b: (a.replace("export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0", ""), b), "loopback node IP"),
        (lambda a, b: (a.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"), b), "dashboard-host"),
        (lambda a, b: (a.replace("REIDSCALE_RAY_OWNER", "OWNER"), b), "tag"),
    ],
    ids=["stop-sh-ray-stop", "start-sh-ray-stop", "no-loopback-switch", "public-dashboard", "no-tag"],
)
def test_local_script_checks_reject_broken_copies(mutate, expected):
    problems = local_script_problems(*mutate(*_local_scripts()))
    assert any(expected in p for p in problems), problems
