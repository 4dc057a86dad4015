"""The Kubernetes manifests, checked offline: render, validate, cross-check; and a live scrape
of a worker's /metrics, /healthz and /readyz."""

import argparse
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import jsonschema
import pytest
import yaml

from producer import Client
from producer.gateway.config import add_serve_flags
from producer.gateway.config import config_from_args as gateway_config
from producer.names import DEFAULT_GROUP, DEFAULT_STREAM
from worker.embedded import free_port
from worker.metrics import HealthServer, MetricsPortInUse
from worker.settings import WorkerConfig, add_worker_flags, setting_names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S_VERSION = "1.33.0"
KEDA_CRD = os.path.join(ROOT, "tests", "k8s", "keda.sh_scaledobjects.yaml")


def render(path):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(["kubectl", "kustomize", os.path.join(ROOT, path)], capture_output=True, text=True,
                         check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.fixture(scope="module")
def overlay():
    return render("k8s/overlays/example")


def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def worker_container(docs):
    return one(docs, "Deployment", "pravaha-worker")["spec"]["template"]["spec"]["containers"][0]


def test_base_and_overlay_render(overlay):
    base = render("k8s/base")
    kinds = {d["kind"] for d in base}
    assert kinds >= {"Deployment", "ConfigMap", "ScaledObject", "PodDisruptionBudget", "StatefulSet",
                     "Service", "NetworkPolicy", "HorizontalPodAutoscaler", "PersistentVolumeClaim"}
    assert {d["kind"] for d in overlay} == kinds | {"Namespace", "Secret"}
    assert all(d["metadata"].get("namespace") == "pravaha" for d in overlay if d["kind"] != "Namespace")


def test_builtin_kinds_validate_strictly(overlay):
    import kubernetes_validate

    for doc in overlay:
        if doc["kind"] == "ScaledObject":
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)   # raises on any error
    broken = copy.deepcopy(one(overlay, "Deployment", "pravaha-worker"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProb"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def strict_schema(schema):
    """Unknown fields become errors on every object schema that lists its properties."""
    if isinstance(schema, dict):
        schema = {k: strict_schema(v) for k, v in schema.items()}
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict_schema(v) for v in schema]
    return schema


def keda_schema():
    with open(KEDA_CRD) as f:
        crd = yaml.safe_load(f)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    return strict_schema(version["schema"]["openAPIV3Schema"])


def test_scaled_object_matches_keda_crd(overlay):
    scaled = one(overlay, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    schema = keda_schema()
    jsonschema.validate(scaled, schema)
    typo = copy.deepcopy(scaled)
    typo["spec"]["minReplicaCounts"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, schema)
    assert scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]   # the CRD's CEL rule


def test_scaled_object_scales_on_the_worker_groups_lag(overlay):
    scaled = one(overlay, "ScaledObject")
    deployment = one(overlay, "Deployment", "pravaha-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] == 0   # scale to zero allowed
    triggers = {t["name"]: t for t in scaled["spec"]["triggers"]}
    lag = triggers["lag"]["metadata"]
    assert triggers["lag"]["type"] == "redis-streams"
    assert isinstance(lag["lagCount"], str) and isinstance(lag["activationLagCount"], str)
    env = {e["name"] for e in worker_container(overlay)["env"]}
    for trig in scaled["spec"]["triggers"]:
        meta = trig["metadata"]
        assert (meta["stream"], meta["consumerGroup"]) == (DEFAULT_STREAM, DEFAULT_GROUP)
        assert meta["addressFromEnv"] in env and meta["passwordFromEnv"] in env


def test_selectors_match_pod_labels(overlay):
    for kind, name in (("Deployment", "pravaha-worker"), ("Deployment", "pravaha-gateway"), ("StatefulSet", None)):
        obj = one(overlay, kind, name)
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert obj["spec"]["selector"]["matchLabels"].items() <= labels.items()
    worker_labels = one(overlay, "Deployment", "pravaha-worker")["spec"]["template"]["metadata"]["labels"]
    redis_labels = one(overlay, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert one(overlay, "PodDisruptionBudget", "pravaha-worker")["spec"]["selector"]["matchLabels"].items() <= worker_labels.items()
    assert one(overlay, "Service", "pravaha-redis")["spec"]["selector"].items() <= redis_labels.items()
    policy = one(overlay, "NetworkPolicy", "pravaha-redis")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_labels.items()
    allowed = policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert allowed.items() <= worker_labels.items(), "workers must be allowed to reach Redis"
    assert one(overlay, "StatefulSet")["spec"]["serviceName"] == one(overlay, "Service", "pravaha-redis")["metadata"]["name"]


def test_worker_pod_settings_match_worker_defaults(overlay):
    container = worker_container(overlay)
    pod = one(overlay, "Deployment", "pravaha-worker")["spec"]["template"]["spec"]
    config = one(overlay, "ConfigMap", "pravaha-worker")["data"]
    defaults = WorkerConfig(consumer="x")
    flag_envs = {"PRAVAHA_" + name.upper() for name in setting_names()}
    assert set(config) - {"HF_HOME"} <= flag_envs, "every PRAVAHA_ key must be a worker flag"
    assert config["PRAVAHA_STREAM"] == defaults.stream and config["PRAVAHA_GROUP"] == defaults.group
    port = int(config["PRAVAHA_METRICS_PORT"])
    assert port == defaults.metrics_port == container["ports"][0]["containerPort"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pre_stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert "127.0.0.1" in pre_stop and "/drain" in pre_stop and "method='POST'" in pre_stop
    assert not any(e["name"] == "PRAVAHA_DRAIN_TOKEN" for e in container.get("env", [])), \
        "the loopback preStop hook sends no token"
    assert pod["terminationGracePeriodSeconds"] > float(config["PRAVAHA_DRAIN_TIMEOUT_S"])
    resources = container["resources"]
    assert resources["requests"] == resources["limits"] and resources["limits"]["nvidia.com/gpu"] == "1"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    secret = one(overlay, "Secret")["metadata"]["name"]
    refs = [e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e
            and "secretKeyRef" in e["valueFrom"]]
    assert refs and all(r == secret for r in refs)
    assert {e["name"]: e.get("value") for e in container["env"]}["PRAVAHA_REDIS_URL"].endswith("@pravaha-redis:6379/0")


def test_gateway_deployment_service_pdb_hpa(overlay, monkeypatch):
    deployment = one(overlay, "Deployment", "pravaha-gateway")
    pod = deployment["spec"]["template"]
    labels, container = pod["metadata"]["labels"], pod["spec"]["containers"][0]
    assert container["args"][0] == "serve" and "nvidia.com/gpu" not in container["resources"]["limits"]
    service = one(overlay, "Service", "pravaha-gateway")["spec"]
    assert service["selector"].items() <= labels.items()
    assert service["ports"][0]["targetPort"] == container["ports"][0]["name"]
    assert one(overlay, "PodDisruptionBudget", "pravaha-gateway")["spec"]["selector"]["matchLabels"].items() \
        <= labels.items()
    hpa = one(overlay, "HorizontalPodAutoscaler", "pravaha-gateway")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pravaha-gateway"}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    policy = one(overlay, "NetworkPolicy", "pravaha-redis")["spec"]
    allowed = policy["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert allowed.items() <= labels.items(), "gateways must be allowed to reach Redis"
    # The env the pod sets is what `pravaha serve` reads: its port and files dir line up.
    env = {e["name"]: e.get("value") for e in container["env"]}
    for name, value in env.items():
        if value is not None and "$(" not in value:
            monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    config = gateway_config(parser.parse_args([]))
    assert config.port == container["ports"][0]["containerPort"] == int(pod["metadata"]["annotations"]["prometheus.io/port"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["files"] == config.files_dir
    claim = next(v for v in pod["spec"]["volumes"] if v["name"] == "files")["persistentVolumeClaim"]["claimName"]
    pvc = one(overlay, "PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "every gateway replica mounts the files"


def test_redis_persists_with_aof(overlay):
    redis_conf = one(overlay, "ConfigMap", "pravaha-redis")["data"]["redis.conf"]
    assert "appendonly yes" in redis_conf
    sts = one(overlay, "StatefulSet")
    claim = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    mounts = sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert any(m["name"] == claim and m["mountPath"] == "/data" for m in mounts) and "dir /data" in redis_conf


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def post(url, headers=None):
    try:
        request = urllib.request.Request(url, method="POST", headers=headers or {})
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_metrics_port_open_only_to_prometheus(overlay):
    worker_labels = one(overlay, "Deployment", "pravaha-worker")["spec"]["template"]["metadata"]["labels"]
    policy = one(overlay, "NetworkPolicy", "pravaha-worker-metrics")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= worker_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    [rule] = policy["ingress"]
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    [source] = rule["from"]
    assert set(source) == {"namespaceSelector"}, "only a namespace (Prometheus's) may reach the port"
    assert source["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}


class _Draining:
    """What HealthServer needs of a worker to serve /drain."""
    stopping = False

    def stop(self):
        self.stopping = True


def test_drain_needs_post_and_the_token_or_loopback():
    """POST only; with a token set, only `Bearer <token>` drains, even from loopback."""
    worker = _Draining()
    health = HealthServer(worker, 0, host="127.0.0.1", drain_token="s3cret").start()
    base = f"http://127.0.0.1:{health.port}/drain"
    try:
        assert get(base)[0] == 405 and not worker.stopping
        assert post(base) == (403, "forbidden\n") and not worker.stopping
        assert post(base, {"Authorization": "Bearer wrong"})[0] == 403 and not worker.stopping
        assert post(base, {"Authorization": "Bearer s3cret"}) == (200, "draining\n") and worker.stopping
    finally:
        health.stop()
    health = HealthServer(_Draining(), 0, host="127.0.0.1").start()
    try:
        assert post(f"http://127.0.0.1:{health.port}/drain")[0] == 200, "no token: loopback may drain"
        assert not health.may_drain("10.0.0.7", None), "no token: other hosts may not"
        assert not health.may_drain("10.0.0.7", "Bearer "), "an empty token is no token"
    finally:
        health.stop()


def test_drain_token_stays_out_of_help_and_repr():
    parser = argparse.ArgumentParser()
    add_worker_flags(parser, {"PRAVAHA_DRAIN_TOKEN": "s3cret"})
    assert parser.parse_args([]).drain_token == "s3cret"
    assert "s3cret" not in parser.format_help()
    assert "s3cret" not in repr(WorkerConfig(consumer="x", drain_token="s3cret"))


def test_taken_metrics_port_fails_before_the_model_loads():
    """A second worker on one host: a one-line error in seconds, before the model loads (the
    model path here does not exist, so reaching the load would fail differently)."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsPortInUse, match=f"metrics port {port} is in use.*--metrics-port 0"):
            HealthServer(_Draining(), port)
        proc = subprocess.run([sys.executable, "-m", "worker.cli", "worker", "--metrics-port", str(port),
                               "--model", "/nonexistent/checkpoint", "--redis-url", "redis://127.0.0.1:1/0"],
                              cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"pravaha worker: metrics port {port} is in use (another "
                                                "worker on this host?); --metrics-port 0 takes a free port, "
                                                "-1 serves none"]
    health = HealthServer(_Draining(), 0, host="127.0.0.1")
    assert health.port > 0, "--metrics-port 0 takes a free port"
    health.stop()


def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_live_worker_endpoints(redis_server, start_worker):
    port = free_port()
    worker = start_worker(redis_server.url, metrics_port=port)
    base = f"http://127.0.0.1:{port}"
    assert get(base + "/healthz") == (200, "ok\n")
    assert get(base + "/readyz") == (200, "ready\n")
    client = Client(redis_server.url)
    results = [client.generate(f"prompt {i}", {"max_tokens": 6, "ignore_eos": True}, timeout=60) for i in range(3)]
    assert all(len(r.token_ids) == 6 for r in results)
    deadline = time.monotonic() + 15
    while True:   # lag/pending gauges are refreshed every few seconds
        status, text = get(base + "/metrics")
        if metric(text, "pravaha_requests_finished_total") == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200
    assert metric(text, "pravaha_requests_received_total") == 3
    assert metric(text, "pravaha_generation_tokens_total") == 18
    assert metric(text, "pravaha_time_to_first_token_seconds_count") == 3
    assert metric(text, "pravaha_e2e_request_latency_seconds_count") == 3
    assert metric(text, "pravaha_kv_blocks_total") > 0 and metric(text, "pravaha_kv_blocks_used") == 0
    for name in ("pravaha_consumer_group_lag", "pravaha_consumer_group_pending", "pravaha_running_sequences",
                 "pravaha_waiting_sequences", "pravaha_preemptions_total", "pravaha_step_seconds_count",
                 "pravaha_prompt_tokens_total"):
        metric(text, name)
    assert get(base + "/drain") == (405, "use POST\n")
    assert get(base + "/readyz") == (200, "ready\n"), "a GET must not drain"
    assert post(base + "/drain") == (200, "draining\n")
    assert get(base + "/readyz") == (503, "draining\n")
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(timeout=30) == 0


def test_quantized_worker_reports_weights_and_kernels(redis_server, start_worker):
    """--quantization int8: the worker serves, and /metrics says which kernel path each layer takes."""
    port = free_port()
    start_worker(redis_server.url, metrics_port=port, quantization="int8", dtype="bfloat16")
    result = Client(redis_server.url).generate("quantized", {"max_tokens": 5, "ignore_eos": True}, timeout=60)
    assert len(result.token_ids) == 5 and result.finish_reason == "length"
    status, text = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    # dummy:llama-tiny: 2 layers x (qkv, o, gate_up) + the tied head take the int8 kernel; the two
    # down projections (in_features 172, not a multiple of 16) dequantize.
    assert metric(text, 'pravaha_quantized_linear_layers{kernel="int8pack_mm",quantization="int8"}') == 7
    assert metric(text, 'pravaha_quantized_linear_layers{kernel="dequant",quantization="int8"}') == 2
    assert 0 < metric(text, "pravaha_model_weight_bytes") < 444032   # bf16 unquantized: 444032 bytes
