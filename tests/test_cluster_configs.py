"""Every shipped cluster config is checked here, before a cluster ever sees it.

Launcher YAMLs against the schema installed with Ray (what `ray up` checks), KubeRay manifests against the
CRDs' openAPIV3Schema with unknown fields rejected (what `kubectl apply --validate=strict` checks), runtime envs
against `ray.runtime_env.RuntimeEnv`, and every `python jobs/<name>.py ...` and `ray ...` command line in a
manifest or in docs/cluster.md against the job's own argparse parser or Ray's CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib.util
import io
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
DOC = REPO / "docs" / "cluster.md"
JOBS = REPO / "jobs"
# Copies of ray-project/kuberay's CRDs (see NOTICE there), so the tests pass on a plain clone.
CRD_DIR = Path(__file__).resolve().parent / "schemas" / "kuberay"

JOB_NAMES = ("ingest", "train", "tune", "score", "report")
# Where the project images (cluster/Dockerfile) keep the repository; manifests use it as working_dir.
IMAGE_REPO_DIR = "/home/ray/mura_ray"

CLUSTER_YAMLS = sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))
MANIFESTS = sorted(p for p in CLUSTER_YAMLS if p.parent == KUBERAY)
LAUNCHER_CONFIGS = sorted(p for p in CLUSTER_YAMLS if p.parent == CLUSTER and p != RUNTIME_ENV)


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# --- YAML -------------------------------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that rejects duplicate mapping keys: PyYAML keeps the last one silently, kubectl does not."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=_UniqueKeyLoader) if doc is not None]


def _load_one(path: Path) -> dict[str, Any]:
    docs = _load_docs(path)
    assert len(docs) == 1, f"{_rel(path)}: expected one YAML document, found {len(docs)}"
    return docs[0]


def _errors(validator: jsonschema.protocols.Validator, instance: Any) -> list[str]:
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    ]


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=_rel)
def test_every_cluster_yaml_parses(path: Path) -> None:
    docs = _load_docs(path)
    assert docs, f"{_rel(path)} is empty"
    assert all(isinstance(doc, dict) for doc in docs), f"{_rel(path)}: every document must be a mapping"


def test_every_cluster_yaml_is_checked_below() -> None:
    assert LAUNCHER_CONFIGS, "no launcher config (cluster/*.yaml) found"
    assert MANIFESTS, "no KubeRay manifest (cluster/kuberay/*.yaml) found"
    assert RUNTIME_ENV.exists()
    unchecked = set(CLUSTER_YAMLS) - set(LAUNCHER_CONFIGS) - set(MANIFESTS) - {RUNTIME_ENV}
    assert not unchecked, f"YAML files no test looks at: {sorted(map(_rel, unchecked))}"
    for path in LAUNCHER_CONFIGS:
        config = _load_one(path)
        assert {"cluster_name", "provider"} <= config.keys(), f"{_rel(path)} is not a `ray up` config"
    for path in MANIFESTS:
        for doc in _load_docs(path):
            assert {"apiVersion", "kind"} <= doc.keys(), f"{_rel(path)}: a document without apiVersion/kind"


# --- Ray cluster launcher ---------------------------------------------------------------------------------------


@functools.cache
def _ray_launcher_schema() -> dict[str, Any]:
    return json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=_rel)
def test_launcher_config_matches_ray_schema(path: Path) -> None:
    schema = _ray_launcher_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = _errors(validator, _load_one(path))
    assert not errors, f"{_rel(path)} fails ray-schema.json of Ray {ray.__version__}:\n" + "\n".join(errors)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=_rel)
def test_launcher_config_passes_ray_up_checks(path: Path) -> None:
    """`ray up` fills in the provider defaults, then checks node types and worker counts: do the same, offline."""
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as e:  # private API: the schema test above still runs
        pytest.skip(f"Ray's private config helpers moved: {e}")
    validate_config(prepare_config(_load_one(path)))


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=_rel)
def test_launcher_head_takes_no_work_and_workers_scale_from_zero(path: Path) -> None:
    config = _load_one(path)
    node_types = config["available_node_types"]
    head = config["head_node_type"]
    assert node_types[head]["resources"].get("CPU") == 0, "the head must advertise CPU 0"
    workers = {name: spec for name, spec in node_types.items() if name != head}
    for name, spec in workers.items():
        assert spec.get("min_workers", 0) == 0, f"worker type {name} must scale from 0"
        assert spec.get("max_workers", 0) > 0, f"worker type {name} can never start"

    def is_gpu(spec: dict[str, Any]) -> bool:
        instance_type = spec["node_config"].get("InstanceType", "")
        return spec["resources"].get("GPU", 0) > 0 or re.match(r"^(g|p)\d", instance_type) is not None

    assert any(is_gpu(spec) for spec in workers.values()), "no GPU worker type"
    assert any(not is_gpu(spec) for spec in workers.values()), "no CPU worker type for Ray Data decoding"


def _docker_env(options: list[str]) -> dict[str, str]:
    """Environment variables that `docker run` options (`--env K=V`, `-e K=V`) set in the container."""
    tokens = [token for option in options for token in shlex.split(option)]
    env = {}
    for flag, value in zip(tokens, tokens[1:], strict=False):
        if flag in ("--env", "-e") and "=" in value:
            key, _, val = value.partition("=")
            env[key] = val
    for token in tokens:
        if token.startswith("--env="):
            key, _, val = token.removeprefix("--env=").partition("=")
            env[key] = val
    return env


def _launcher_auth_problems(config: dict[str, Any]) -> list[str]:
    """Why a `ray up` cluster would take jobs without the token. GCS, Ray Client and the raylets listen on the
    nodes' addresses in any multi-node cluster, so keeping the dashboard on localhost would not be enough."""
    docker = config.get("docker", {})
    problems = []
    for name, node_type in config["available_node_types"].items():
        role = "head" if name == config["head_node_type"] else "worker"
        options = docker.get("run_options", []) + docker.get(f"{role}_run_options", [])
        options += node_type.get("docker", {}).get(f"{role}_run_options", [])
        env = _docker_env(options)
        if env.get("RAY_AUTH_MODE") != "token":
            problems.append(f"{name}: the container must run with RAY_AUTH_MODE=token (docker run_options --env)")
        if "RAY_AUTH_TOKEN" in env:
            problems.append(f"{name}: RAY_AUTH_TOKEN puts the token in the config; mount a file instead")
        token_path = env.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")
        source = config.get("file_mounts", {}).get(token_path)
        if source is None:
            problems.append(f"{name}: no file_mounts entry puts the token at {token_path}")
        elif (REPO / Path(source).expanduser()).resolve().is_relative_to(REPO):  # `ray up` runs from REPO
            problems.append(f"{name}: the token file {source} must come from outside the repository")
    starts = " ; ".join(config.get("head_start_ray_commands", []) + config.get("worker_start_ray_commands", []))
    if re.search(r"RAY_AUTH_MODE=(?!token\b)", starts):
        problems.append("a start command overrides RAY_AUTH_MODE")
    return problems


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=_rel)
def test_launcher_cluster_requires_the_token(path: Path) -> None:
    problems = _launcher_auth_problems(_load_one(path))
    assert not problems, f"{_rel(path)}:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "broken",
    [
        lambda c: c["docker"].update(run_options=["--ulimit nofile=65536:65536"]),
        lambda c: c["file_mounts"].pop(_docker_env(c["docker"]["run_options"])["RAY_AUTH_TOKEN_PATH"]),
        lambda c: c["file_mounts"].update({_docker_env(c["docker"]["run_options"])["RAY_AUTH_TOKEN_PATH"]: "./token"}),
        lambda c: c["docker"]["run_options"].append("-e RAY_AUTH_TOKEN=abc"),
        lambda c: c["head_start_ray_commands"].append("RAY_AUTH_MODE=disabled ray start --head"),
    ],
    ids=["no-auth-mode", "no-token-file", "token-in-repo", "inline-token", "start-overrides"],
)
def test_launcher_token_check_catches_an_open_cluster(broken: Any) -> None:
    config = copy.deepcopy(_load_one(CLUSTER / "aws-gpu.yaml"))
    assert not _launcher_auth_problems(config)
    broken(config)
    assert _launcher_auth_problems(config)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=_rel)
def test_launcher_installs_the_project_and_uses_instance_profiles(path: Path) -> None:
    config = _load_one(path)
    mounts = [remote for remote, local in config.get("file_mounts", {}).items() if local in (".", "./")]
    assert mounts, "the working tree must be synced to the nodes (file_mounts REMOTE: .)"
    commands = " ; ".join(config.get("setup_commands", []))
    assert any(re.search(rf"pip install .*{re.escape(m)}\b", commands) for m in mounts), (
        f"setup_commands must pip install the synced project ({mounts}), got: {commands}"
    )
    if config["provider"]["type"] == "aws":
        for name, spec in config["available_node_types"].items():
            assert "IamInstanceProfile" in spec["node_config"], f"{name}: S3 access comes from an instance profile"


# --- KubeRay ----------------------------------------------------------------------------------------------------

# The CRDs leave the top-level `metadata` open (the API server checks it as ObjectMeta); check the parts manifests
# here use, strictly.
_OBJECT_META = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}],
    "additionalProperties": False,
}


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """Reject unknown fields like `kubectl apply --validate=strict`: close every object schema that lists its
    `properties` unless it already says what extra keys may hold or preserves unknown fields."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: _strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_strict(sub) for sub in out[key]]
    return out


@functools.cache
def _crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """(apiVersion, kind) → a strict validator, for every served version of every copied CRD."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 3 MB; libyaml is ~10x faster
    validators = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=loader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served"):
                continue
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = _OBJECT_META
            schema.setdefault("required", [])
            schema["required"] = sorted({*schema["required"], "apiVersion", "kind", "metadata", "spec"})
            validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(_strict(schema))
    return validators


def _ray_objects(path: Path) -> list[dict[str, Any]]:
    """The ray.io objects of a manifest file, including RayJobs a ConfigMap carries for a CronJob to create."""
    objects = []
    for doc in _load_docs(path):
        if doc["apiVersion"].startswith("ray.io/"):
            objects.append(doc)
        elif doc["kind"] == "ConfigMap":
            for key, text in doc.get("data", {}).items():
                if key.endswith((".yaml", ".yml")):
                    embedded = yaml.load(text, Loader=_UniqueKeyLoader)
                    if isinstance(embedded, dict) and str(embedded.get("apiVersion", "")).startswith("ray.io/"):
                        objects.append(embedded)
    return objects


def _job_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """RayJob specs inside a ray.io object: a RayJob's own, or a RayCronJob's template."""
    if obj["kind"] == "RayJob":
        return [obj["spec"]]
    if obj["kind"] == "RayCronJob":
        return [obj["spec"]["jobTemplate"]]
    return []


def _cluster_specs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray cluster specs a ray.io object defines: a RayCluster's own, or the cluster a RayJob starts for itself."""
    if obj["kind"] == "RayCluster":
        return [obj["spec"]]
    return [spec["rayClusterSpec"] for spec in _job_specs(obj) if "rayClusterSpec" in spec]


def test_crds_are_the_ray_io_v1_ones() -> None:
    kinds = {kind for (api, kind) in _crd_validators() if api == "ray.io/v1"}
    assert kinds == {"RayCluster", "RayJob", "RayCronJob"}


@pytest.mark.parametrize("path", MANIFESTS, ids=_rel)
def test_kuberay_manifest_matches_crd_strictly(path: Path) -> None:
    objects = _ray_objects(path)
    assert objects, f"{_rel(path)} holds no ray.io object"
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"])
        assert key[0] == "ray.io/v1", f"{_rel(path)}: use ray.io/v1 (the storage version), not {key[0]}"
        assert key in _crd_validators(), f"{_rel(path)}: no CRD for {key}"
        errors = _errors(_crd_validators()[key], obj)
        assert not errors, f"{_rel(path)} {obj['kind']} fails the CRD:\n" + "\n".join(errors)


@pytest.mark.parametrize(
    ("where", "bad_value"),
    [
        (("spec", "enableInTreeAutoScaling"), True),  # misspelt top-level field
        (("spec", "headGroupSpec", "template", "spec", "serviceAcountName"), "x"),  # misspelt pod field
        (("spec", "workerGroupSpecs", 0, "minReplicas"), "0"),  # wrong type
        (("spec", "authOptions", "mode"), "Token"),  # not one of disabled, token
        (("spec", "authOptions", "token"), "x"),  # the token never goes in the manifest
    ],
)
def test_strict_crd_validation_catches_mistakes(where: tuple[Any, ...], bad_value: Any) -> None:
    (cluster,) = [obj for obj in _ray_objects(KUBERAY / "raycluster.yaml") if obj["kind"] == "RayCluster"]
    broken = copy.deepcopy(cluster)
    node = broken
    for step in where[:-1]:
        node = node[step]
    node[where[-1]] = bad_value
    assert _errors(_crd_validators()[("ray.io/v1", "RayCluster")], broken)


def _raycluster() -> dict[str, Any]:
    (cluster,) = [obj for obj in _ray_objects(KUBERAY / "raycluster.yaml") if obj["kind"] == "RayCluster"]
    return cluster


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def test_raycluster_autoscales_gpu_workers_from_zero() -> None:
    spec = _raycluster()["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", "nothing may be scheduled on the head"

    def gpus(group: dict[str, Any]) -> int:
        limits = [c.get("resources", {}).get("limits", {}) for c in _containers(group["template"])]
        return sum(int(limit.get("nvidia.com/gpu", 0)) for limit in limits)

    groups = spec["workerGroupSpecs"]
    assert all(group["minReplicas"] == 0 for group in groups), "every worker group must scale from 0"
    assert any(gpus(group) > 0 for group in groups), "no GPU worker group"
    assert any(gpus(group) == 0 for group in groups), "no CPU worker group for Ray Data decoding"


def test_ray_pods_get_cloud_credentials_from_their_service_account() -> None:
    docs = _load_docs(KUBERAY / "raycluster.yaml")
    accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
    specs = [spec for path in MANIFESTS for obj in _ray_objects(path) for spec in _cluster_specs(obj)]
    templates = [s["headGroupSpec"]["template"] for s in specs] + [
        g["template"] for s in specs for g in s["workerGroupSpecs"]
    ]
    for template in templates:
        name = template["spec"].get("serviceAccountName")
        assert name in accounts, f"pods must run as a ServiceAccount defined in raycluster.yaml, got {name!r}"
        annotations = accounts[name]["metadata"].get("annotations", {})
        assert {"eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"} & annotations.keys(), (
            f"ServiceAccount {name} needs an IRSA or Workload Identity annotation"
        )


def test_rayjobs_run_on_the_shipped_raycluster_or_a_copy_of_it() -> None:
    """A RayJob selects the shipped RayCluster or starts a cluster from an exact copy of its spec: one definition
    of the cluster, whatever runs the job."""
    cluster = _raycluster()
    specs = [spec for path in MANIFESTS for obj in _ray_objects(path) for spec in _job_specs(obj)]
    assert len(specs) >= 4, "expected RayJobs for train and tune and two nightly scoring schedules"
    for spec in specs:
        if "rayClusterSpec" in spec:
            assert "clusterSelector" not in spec, "a RayJob takes clusterSelector or rayClusterSpec, not both"
            assert spec["rayClusterSpec"] == cluster["spec"], "rayClusterSpec must be a copy of raycluster.yaml's spec"
            assert spec.get("shutdownAfterJobFinishes") is True, "a RayJob's own cluster must go when the job ends"
        else:
            assert spec.get("clusterSelector") == {"ray.io/cluster": cluster["metadata"]["name"]}


# --- Who may submit: token authentication ------------------------------------------------------------------------

# The Secret (key auth_token) that every Ray cluster on Kubernetes takes its token from; created by the operator of
# the cluster, never shipped (test_builtin_objects_are_known_kinds).
AUTH_SECRET = "mura-ray-auth"


def _auth_problems(obj: dict[str, Any], token_clusters: set[str]) -> list[str]:
    """Why a ray.io object would accept jobs without the token; `token_clusters` names the shipped RayClusters that
    require it (a RayJob that selects one of them gets the token from KubeRay)."""
    problems = []
    for spec in _cluster_specs(obj):
        auth = spec.get("authOptions") or {}
        if auth.get("mode") != "token":
            problems.append(f"{obj['kind']}: a Ray cluster without authOptions.mode: token")
        if auth.get("secretName") != AUTH_SECRET:
            problems.append(f"{obj['kind']}: authOptions.secretName is {auth.get('secretName')!r}, not {AUTH_SECRET!r}")
    for spec in _job_specs(obj):
        selected = spec.get("clusterSelector", {}).get("ray.io/cluster")
        if "rayClusterSpec" not in spec and selected not in token_clusters:
            problems.append(f"{obj['kind']}: submits to {selected!r}, not a shipped cluster with token authentication")
    return problems


def _token_clusters() -> set[str]:
    return {
        obj["metadata"]["name"]
        for path in MANIFESTS
        for obj in _ray_objects(path)
        if obj["kind"] == "RayCluster" and not _auth_problems(obj, set())
    }


@pytest.mark.parametrize("path", MANIFESTS, ids=_rel)
def test_every_ray_cluster_requires_the_token(path: Path) -> None:
    """Ray's job API runs arbitrary code: no cluster that can hold patient data may take a job without the token."""
    problems = [p for obj in _ray_objects(path) for p in _auth_problems(obj, _token_clusters())]
    assert not problems, f"{_rel(path)}:\n" + "\n".join(problems)


def test_nightly_scoring_clusters_take_the_token_from_the_secret() -> None:
    for path in (KUBERAY / "raycronjob-score.yaml", KUBERAY / "cronjob-score.yaml"):
        specs = [spec for obj in _ray_objects(path) for spec in _cluster_specs(obj)]
        assert specs, f"{_rel(path)}: the scoring RayJob must define its cluster (rayClusterSpec)"
        for spec in specs:
            assert spec["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}, _rel(path)


@pytest.mark.parametrize(
    "broken",
    [
        lambda obj: obj["spec"].pop("authOptions"),
        lambda obj: obj["spec"]["authOptions"].update(mode="disabled"),
        lambda obj: obj["spec"]["authOptions"].pop("secretName"),
    ],
    ids=["no-authOptions", "mode-disabled", "generated-secret"],
)
def test_token_check_catches_an_open_cluster(broken: Any) -> None:
    cluster = copy.deepcopy(_raycluster())
    assert not _auth_problems(cluster, set())
    broken(cluster)
    assert _auth_problems(cluster, set())
    job = {"kind": "RayJob", "spec": {"clusterSelector": {"ray.io/cluster": "mura-ray"}}}
    assert not _auth_problems(job, {"mura-ray"})
    assert _auth_problems(job, set()), "a RayJob that selects a cluster without the token must fail"


def test_strict_crd_validation_catches_misplaced_auth_options() -> None:
    """authOptions belongs to a cluster spec; on a RayJob that selects a cluster it would be dropped by the API."""
    (job,) = [obj for obj in _ray_objects(KUBERAY / "rayjob-train.yaml") if obj["kind"] == "RayJob"]
    broken = copy.deepcopy(job)
    broken["spec"]["authOptions"] = {"mode": "token"}
    assert _errors(_crd_validators()[("ray.io/v1", "RayJob")], broken)


def test_scoring_scheduler_cannot_read_secrets() -> None:
    """The CronJob's pod only creates RayJobs: KubeRay, not the pod, hands the token to the submitter."""
    for doc in _load_docs(KUBERAY / "cronjob-score.yaml"):
        if doc["kind"] == "Role":
            for rule in doc["rules"]:
                assert "" not in rule["apiGroups"] and "secrets" not in rule["resources"], rule


@pytest.mark.parametrize("path", MANIFESTS, ids=_rel)
def test_manifest_runtime_envs_are_valid(path: Path) -> None:
    for obj in _ray_objects(path):
        for spec in _job_specs(obj):
            if "runtimeEnvYAML" not in spec:
                continue
            runtime_env = yaml.load(spec["runtimeEnvYAML"], Loader=_UniqueKeyLoader)
            unknown = set(runtime_env) - RuntimeEnv.known_fields
            assert not unknown, f"{_rel(path)}: unknown runtime_env fields {sorted(unknown)}"
            # working_dir is a path inside the project image, which holds this repository.
            if runtime_env.get("working_dir") == IMAGE_REPO_DIR:
                runtime_env["working_dir"] = str(REPO)
            RuntimeEnv(**runtime_env)


def test_runtime_env_file_is_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime_env = _load_one(RUNTIME_ENV)
    unknown = set(runtime_env) - RuntimeEnv.known_fields  # RuntimeEnv would take them as plugin names
    assert not unknown, f"unknown runtime_env fields {sorted(unknown)}; known: {sorted(RuntimeEnv.known_fields)}"
    assert runtime_env["working_dir"] == "."
    assert "pip" not in runtime_env and "uv" not in runtime_env, "dependencies come with the nodes, not per job"
    excluded = " ".join(runtime_env["excludes"])
    for heavy in (".venv", ".git", "runs"):
        assert heavy in excluded, f"{heavy} must not be uploaded with every job"
    assert all(isinstance(v, str) for v in runtime_env.get("env_vars", {}).values()), "env_vars must be strings"
    monkeypatch.chdir(REPO)  # `ray job submit` resolves working_dir "." from the repository root
    RuntimeEnv(**runtime_env)


# --- Plain Kubernetes objects -----------------------------------------------------------------------------------


def _builtin_objects() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in MANIFESTS for d in _load_docs(p) if not d["apiVersion"].startswith("ray.io/")]


def test_builtin_objects_are_known_kinds() -> None:
    """Besides ray.io objects, only what the manifests need; in particular no Secret (credentials stay out)."""
    known = {
        ("v1", "ServiceAccount"),
        ("v1", "ConfigMap"),
        ("rbac.authorization.k8s.io/v1", "Role"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding"),
        ("batch/v1", "CronJob"),
    }
    for path, doc in _builtin_objects():
        assert (doc["apiVersion"], doc["kind"]) in known, f"{_rel(path)}: unexpected {doc['apiVersion']} {doc['kind']}"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", doc["metadata"]["name"])


def test_scoring_cronjob_is_complete() -> None:
    path = KUBERAY / "cronjob-score.yaml"
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _load_docs(path)}
    (cronjob,) = [d for (kind, _), d in docs.items() if kind == "CronJob"]
    spec = cronjob["spec"]
    assert len(spec["schedule"].split()) == 5, "schedule must be a 5-field cron expression"
    assert spec.get("concurrencyPolicy") == "Forbid", "two scoring runs must not overlap"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure"), "Job pods need restartPolicy Never or OnFailure"
    assert pod["containers"] and all({"name", "image"} <= c.keys() for c in pod["containers"])

    account = pod["serviceAccountName"]
    assert ("ServiceAccount", account) in docs
    bindings = [d for (kind, _), d in docs.items() if kind == "RoleBinding"]
    roles = {
        b["roleRef"]["name"]
        for b in bindings
        if {"kind": "ServiceAccount", "name": account} in [{k: s[k] for k in ("kind", "name")} for s in b["subjects"]]
    }
    rules = [rule for name in roles for rule in docs[("Role", name)]["rules"]]
    assert any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"] for r in rules), (
        f"ServiceAccount {account} may not create rayjobs"
    )

    mounts = {m["name"]: m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
    script = " ".join(" ".join(c.get("command", []) + c.get("args", [])) for c in pod["containers"])
    for volume in pod["volumes"]:
        config_map = volume["configMap"]["name"]
        assert ("ConfigMap", config_map) in docs, f"volume {volume['name']} refers to a missing ConfigMap"
        for key in docs[("ConfigMap", config_map)]["data"]:
            assert f"{mounts[volume['name']]}/{key}" in script, f"the script never reads {key}"


# --- Job command lines ------------------------------------------------------------------------------------------

_SHELL_OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}


def _split(command: str) -> list[str]:
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def _segments(command: str) -> list[list[str]]:
    """A shell line split at operators (&&, |, ;), each segment with leading VAR=value assignments dropped."""
    segments: list[list[str]] = [[]]
    for token in _split(command):
        if token in _SHELL_OPERATORS:
            segments.append([])
        else:
            segments[-1].append(token)
    out = []
    for segment in segments:
        while segment and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", segment[0]):
            segment = segment[1:]
        if segment:
            out.append(segment)
    return out


def _job_invocations(command: str) -> list[tuple[str, list[str]]]:
    """(job name, argv) for every `python jobs/<name>.py ARGS` in a shell command (also after `ray job submit --`)."""
    found = []
    for segment in _segments(command):
        for i, token in enumerate(segment[:-1]):
            script = re.fullmatch(r"(?:\./)?jobs/(\w+)\.py", segment[i + 1])
            if re.fullmatch(r"(?:\S*/)?python(?:3(?:\.\d+)?)?", token) and script:
                found.append((script.group(1), segment[i + 2 :]))
    return found


def _doc_commands() -> list[str]:
    """Shell commands in docs/cluster.md code blocks, with `\\` continuations joined and `$ ` prompts removed."""
    blocks: list[str] = []
    language, lines = None, []  # language is None outside a fenced block
    for line in DOC.read_text().splitlines():
        fence = re.match(r"^```\s*(\S*)", line)
        if fence and language is None:
            language, lines = fence.group(1), []
        elif fence:
            if language in ("", "bash", "sh", "shell", "console"):
                blocks.append("\n".join(lines))
            language = None
        elif language is not None:
            lines.append(line)
    assert language is None, "docs/cluster.md has an unclosed code block"
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _manifest_commands() -> list[tuple[str, str]]:
    return [
        (_rel(path), spec["entrypoint"]) for path in MANIFESTS for obj in _ray_objects(path) for spec in _job_specs(obj)
    ]


def _all_invocations() -> list[tuple[str, str, list[str]]]:
    """(where, job name, argv) for every job command line in the manifests and the docs."""
    sources = _manifest_commands() + [(_rel(DOC), command) for command in _doc_commands()]
    return [(where, job, argv) for where, command in sources for job, argv in _job_invocations(command)]


def test_command_parsing() -> None:
    command = "RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/train.py --epochs 2 && ls # x"
    assert _job_invocations(command) == [("train", ["--epochs", "2"])]
    assert _job_invocations(".venv/bin/python jobs/score.py --tta | tee log") == [("score", ["--tta"])]


def test_every_entrypoint_runs_a_job_script() -> None:
    for where, entrypoint in _manifest_commands():
        invocations = _job_invocations(entrypoint)
        assert len(invocations) == 1, f"{where}: entrypoint must be one `python jobs/<name>.py ...`: {entrypoint}"
    for where, job, _ in _all_invocations():
        assert job in JOB_NAMES, f"{where}: jobs/{job}.py is not one of the jobs {JOB_NAMES}"
    documented = {job for where, job, _ in _all_invocations() if where == _rel(DOC)}
    assert {"ingest", "train", "tune", "score", "report"} <= documented, "docs/cluster.md must show every job"


class _Rejected(Exception):
    """A job's parser refused a command line."""


def _job_parser(job: str) -> argparse.ArgumentParser:
    """A fresh parser from jobs/<job>.py's build_parser(), imported without running the job."""
    spec = importlib.util.spec_from_file_location(f"_mura_job_{job}", JOBS / f"{job}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert hasattr(module, "build_parser"), f"jobs/{job}.py must define build_parser() -> ArgumentParser"
    return module.build_parser()


def _unless_written(job: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not (JOBS / f"{job}.py").exists(), reason=f"jobs/{job}.py not written yet")


@pytest.mark.parametrize("job", [pytest.param(job, marks=_unless_written(job)) for job in JOB_NAMES])
def test_job_command_lines_parse(job: str) -> None:
    """Every documented or shipped command line for a job is accepted by that job's own parser."""
    parser = _job_parser(job)

    def reject(message: str) -> None:
        # argparse calls error() for every bad command line; jobs may override it to exit or raise their own way.
        raise _Rejected(message)

    parser.error = reject  # type: ignore[method-assign]
    problems = []
    for where, name, argv in _all_invocations():
        if name != job:
            continue
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                parser.parse_args(argv)
        except _Rejected as e:
            problems.append(f"{where}: python jobs/{job}.py {shlex.join(argv)}\n  {e}")
    assert not problems, "\n".join(problems)


def test_referenced_recipes_exist() -> None:
    if not (JOBS / "configs").is_dir():
        pytest.skip("jobs/configs/ not written yet")
    for where, job, argv in _all_invocations():
        for flag, value in zip(argv, argv[1:], strict=False):
            if flag in ("--config", "--space") and value.startswith("jobs/"):
                assert (REPO / value).exists(), f"{where}: jobs/{job}.py {flag} {value}: no such file"


def test_doc_ray_commands_use_real_options() -> None:
    """`ray job submit`, `ray up`, ... lines in the docs parse with Ray's own CLI (click) definitions."""
    import click
    from ray.scripts.scripts import cli

    problems = []
    for command in _doc_commands():
        for segment in _segments(command):
            if segment[0] != "ray":
                continue
            cmd, depth = cli, 1
            while isinstance(cmd, click.Group) and depth < len(segment) and segment[depth] in cmd.commands:
                cmd, depth = cmd.commands[segment[depth]], depth + 1
            if isinstance(cmd, click.Group):
                problems.append(f"unknown ray subcommand: {shlex.join(segment)}")
                continue
            try:
                cmd.make_context(" ".join(segment[:depth]), segment[depth:])
            except click.ClickException as e:
                problems.append(f"{shlex.join(segment)}\n  {e.format_message()}")
    assert not problems, "\n".join(problems)


def test_doc_submissions_send_the_token() -> None:
    """Every `ray job` command on the page runs with RAY_AUTH_MODE=token, set on it or exported before it."""
    exported = False
    submissions = 0
    for command in _doc_commands():
        for segment in _split_assignments(command):
            assignments, argv = segment
            if argv[:2] == ["export", "RAY_AUTH_MODE=token"]:
                exported = True
            if argv[:2] == ["ray", "job"]:
                submissions += 1
                assert exported or assignments.get("RAY_AUTH_MODE") == "token", f"no token for: {command}"
    assert submissions, "docs/cluster.md shows no `ray job` command"


def _split_assignments(command: str) -> list[tuple[dict[str, str], list[str]]]:
    """Each segment of a shell line as (leading VAR=value assignments, the rest)."""
    out = []
    segment: list[str] = []
    for token in [*_split(command), ";"]:
        if token not in _SHELL_OPERATORS:
            segment.append(token)
            continue
        assignments = {}
        while segment and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", segment[0]):
            key, _, value = segment.pop(0).partition("=")
            assignments[key] = value
        if segment:
            out.append((assignments, segment))
        segment = []
    return out


def test_doc_shows_where_each_cluster_token_comes_from() -> None:
    """Local and `ray up`: the laptop's token file; KubeRay: the Secret the manifests name, created and read back."""
    commands = _doc_commands()
    assert "ray get-auth-token --generate" in commands
    assert any(c.startswith(f"kubectl create secret generic -n mura {AUTH_SECRET} ") for c in commands)
    assert any(
        c.startswith("export RAY_AUTH_TOKEN=") and f"kubectl get secret -n mura {AUTH_SECRET} " in c for c in commands
    ), "docs/cluster.md must show RAY_AUTH_TOKEN read from the Secret"
    config = _load_one(CLUSTER / "aws-gpu.yaml")
    token_path = _docker_env(config["docker"]["run_options"])["RAY_AUTH_TOKEN_PATH"]
    assert f"`{config['file_mounts'][token_path]}`" in DOC.read_text(), "the doc must name the token file ray up copies"


def test_doc_paths_exist() -> None:
    text = DOC.read_text()
    for path in sorted(set(re.findall(r"\bcluster/[\w./-]*\w", text))):
        assert (REPO / path).exists(), f"docs/cluster.md mentions {path}, which does not exist"


# --- Consistency and hygiene ------------------------------------------------------------------------------------


def test_one_ray_version_everywhere() -> None:
    """The cluster's Ray must match across images and rayVersion (and the laptop's, per docs/cluster.md)."""
    text = "\n".join(p.read_text() for p in [*CLUSTER_YAMLS, CLUSTER / "Dockerfile"] if p.exists())
    versions = set(re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text))
    versions |= {_raycluster()["spec"]["rayVersion"]}
    assert len(versions) == 1, f"several Ray versions in cluster/: {sorted(versions)}"


_SECRET_PATTERNS = [
    r"AKIA[0-9A-Z]{16}",  # AWS access key id
    r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{20,}",
    r"(?i)aws_session_token\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{20,}",
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
]


@pytest.mark.parametrize("path", sorted(p for p in CLUSTER.rglob("*") if p.is_file()) + [DOC], ids=_rel)
def test_no_credentials_in_files(path: Path) -> None:
    text = path.read_text()
    for pattern in _SECRET_PATTERNS:
        assert not re.search(pattern, text), f"{_rel(path)} looks like it holds a credential ({pattern})"
