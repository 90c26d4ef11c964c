"""Verify the service_replicas scenario: 2 cla2 serve replicas pinned to the fake device groups [[0], [1]]
behind one HAProxy endpoint; a killed replica comes back while the endpoint keeps answering; a rolling
restart fails no request; a device group the host lacks is refused before anything changes."""

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(os.environ.get("MOLECULE_PROJECT_DIRECTORY", Path(__file__).resolve().parents[3]))
KEY = "molecule-secret"
PORT = 19327
NAME = "cla2-serve"
REPLICAS = [0, 1]
BASE_PORT = PORT + 100
SOCK = f"/run/{NAME}/admin.sock"
VARS = {"inference_service_model": "tiny-llama", "inference_service_device_groups": [[0], [1]],
        "inference_service_api_key": KEY, "inference_service_bind_address": "0.0.0.0"}


def play(**extra):
    cmd = ["ansible-playbook", "-i", os.environ["MOLECULE_INVENTORY_FILE"], str(ROOT / "playbooks" / "serve.yml"),
           "-e", json.dumps({**VARS, **extra})]
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_ROLES_PATH": str(ROOT / "roles")}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)


def inspect(host, name):
    return json.loads(host.check_output(f"docker inspect {name}"))[0]


def address(host):
    """The sandbox host's address as the controller reaches it (the endpoint binds 0.0.0.0): its container's
    address on the controller's docker network (inside, `hostname -I` lists the nested docker0 first)."""
    fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
    ip = subprocess.check_output(["docker", "inspect", "-f", fmt, host.backend.host], text=True).split()[0]
    return f"http://{ip}:{PORT}"


def haproxy_status(host):
    out = host.check_output(f"/usr/local/sbin/cla2-haproxy-admin {SOCK} 'show stat'")
    rows = [line.split(",") for line in out.splitlines() if line.startswith("replicas,r")]
    return {row[1]: row[17] for row in rows}


def wait_until(check, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1)
    raise AssertionError(f"not within {seconds}s: {what}")


def chat(url, timeout=60):
    return requests.post(f"{url}/v1/chat/completions", timeout=timeout, headers={"Authorization": f"Bearer {KEY}"},
                         json={"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4, "temperature": 0})


class Client(threading.Thread):
    """Sends chat completions through the endpoint back to back and records every status."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.url, self.codes, self.stop = url, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.codes.append(chat(self.url).status_code)
            except requests.RequestException as exc:
                self.codes.append(repr(exc))

    def finish(self):
        self.stop.set()
        self.join(90)
        return self.codes


def test_each_replica_is_its_own_unit_pinned_to_its_device_group(host):
    for r in REPLICAS:
        svc = host.service(f"{NAME}-r{r}")
        assert svc.is_enabled and svc.is_running
        info = inspect(host, f"{NAME}-r{r}")
        devices = {d["PathOnHost"]: d["PathInContainer"] for d in info["HostConfig"]["Devices"]}
        # only its own device node (seen inside as device 0), plus the shared control nodes
        assert devices == {f"/dev/cambricon_dev{r}": "/dev/cambricon_dev0", "/dev/cambricon_ctl": "/dev/cambricon_ctl",
                           "/dev/cambricon_ipcm0": "/dev/cambricon_ipcm0"}
        assert "MLU_VISIBLE_DEVICES=0" in info["Config"]["Env"]
        args = info["Config"]["Cmd"]
        assert args[args.index("--devices") + 1] == "0"
        assert args[args.index("--port") + 1] == str(BASE_PORT + r)
        assert args[args.index("--host") + 1] == "127.0.0.1"
        # the device kind is given, never guessed: the sandbox's inventory says cpu (real hosts: mlu)
        assert args[args.index("--device") + 1] == "cpu"
        inside = host.check_output(f"docker exec {NAME}-r{r} sh -c 'ls -1 /dev | grep ^cambricon_dev'").split()
        assert inside == ["cambricon_dev0"]
        assert host.socket(f"tcp://127.0.0.1:{BASE_PORT + r}").is_listening


def test_endpoint_is_haproxy_with_active_health_checks_and_both_replicas_up(host):
    svc = host.service(NAME)
    assert svc.is_enabled and svc.is_running
    cfg = host.file(f"/etc/haproxy/{NAME}.cfg").content_string
    assert "option httpchk GET /health" in cfg and "http-check expect status 200" in cfg
    assert "option redispatch" in cfg and "retries 3" in cfg
    assert host.socket(f"tcp://0.0.0.0:{PORT}").is_listening
    assert "haproxy" in host.check_output(f"ss -ltnp 'sport = :{PORT}'")
    assert haproxy_status(host) == {"r0": "UP", "r1": "UP"}
    assert host.run(f"haproxy -c -f /etc/haproxy/{NAME}.cfg").rc == 0


def test_chat_completion_through_the_endpoint_and_the_key_is_checked(host):
    url = address(host)
    res = chat(url)
    assert res.status_code == 200, res.text
    assert res.json()["choices"][0]["message"]["role"] == "assistant"
    refused = requests.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                            timeout=30)
    assert refused.status_code == 401
    assert requests.get(f"{url}/health", timeout=30).json()["status"] == "ok"
    # both replicas serve: HAProxy's per-server request counters (field 7, stot) grow on both
    for _ in range(8):
        assert chat(url).status_code == 200
    out = host.check_output(f"/usr/local/sbin/cla2-haproxy-admin {SOCK} 'show stat'")
    totals = {row.split(",")[1]: int(row.split(",")[7]) for row in out.splitlines() if row.startswith("replicas,r")}
    assert all(n > 0 for n in totals.values()), totals


def test_no_secret_in_the_units_and_the_env_file_is_private(host):
    for unit in [NAME] + [f"{NAME}-r{r}" for r in REPLICAS]:
        assert KEY not in host.file(f"/etc/systemd/system/{unit}.service").content_string
    env = host.file(f"/etc/cla2/{NAME}.env")
    assert env.mode == 0o600 and env.user == "root"
    assert KEY not in host.file(f"/etc/haproxy/{NAME}.cfg").content_string


def serve_pid(host, container):
    """The host's pid of the cla2 serve process in a replica's container (not docker-init)."""
    pid = host.check_output(f"docker top {container} -eo pid,args | awk 'NR > 1 && /cla2 serve/ && !/docker-init/ "
                            "{{print $1; exit}}'")
    assert pid.strip().isdigit(), pid
    return pid.strip()


def test_each_replica_container_is_confined(host):
    memtotal_kib = int(host.check_output("awk '/^MemTotal:/ {print $2}' /proc/meminfo"))
    for r in REPLICAS:
        config = inspect(host, f"{NAME}-r{r}")["HostConfig"]
        assert "no-new-privileges" in config["SecurityOpt"], config["SecurityOpt"]
        assert config["CapDrop"] == ["ALL"] and not config["CapAdd"], (config["CapDrop"], config["CapAdd"])
        assert config["IpcMode"] == "private" and config["ShmSize"] == 1024**3
        assert config["PidsLimit"] == 4096
        # auto: 90% of the host's memory shared by the 2 replicas
        assert config["Memory"] == int(memtotal_kib * 0.9 / len(REPLICAS)) * 1024 == config["MemorySwap"]
        assert not config["Privileged"]
        # the server itself holds no capability and cannot gain one
        status = host.file(f"/proc/{serve_pid(host, f'{NAME}-r{r}')}/status").content_string
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        assert fields["CapEff"].strip() == "0000000000000000" and fields["CapPrm"].strip() == "0000000000000000"
        assert fields["NoNewPrivs"].strip() == "1"


def test_killed_replica_endpoint_keeps_answering_and_systemd_brings_it_back(host):
    url = address(host)
    restarts = int(host.check_output(f"systemctl show -p NRestarts --value {NAME}-r0"))
    started = inspect(host, f"{NAME}-r0")["State"]["StartedAt"]
    client = Client(url)
    client.start()
    time.sleep(2)
    # kill -9 the serve process itself (not docker-init)
    host.check_output(f"kill -9 {serve_pid(host, f'{NAME}-r0')}")
    wait_until(lambda: haproxy_status(host).get("r0") != "UP", 20, "HAProxy takes the killed replica out")
    wait_until(lambda: int(host.check_output(f"systemctl show -p NRestarts --value {NAME}-r0")) > restarts, 60,
               "systemd restarts the killed replica")
    wait_until(lambda: haproxy_status(host) == {"r0": "UP", "r1": "UP"}, 120, "HAProxy sees the replica UP again")
    time.sleep(2)
    codes = client.finish()
    assert inspect(host, f"{NAME}-r0")["State"]["StartedAt"] != started
    assert len(codes) >= 10, codes
    assert set(codes) == {200}, [c for c in codes if c != 200]


def scur(host, replica):
    """The requests HAProxy has on a replica now (`show stat` field 5, scur)."""
    out = host.check_output(f"/usr/local/sbin/cla2-haproxy-admin {SOCK} 'show stat'")
    return int(next(line.split(",")[4] for line in out.splitlines() if line.startswith(f"replicas,r{replica},")))


def test_a_roll_does_not_restart_a_replica_with_a_request_in_flight_at_the_drain_timeout(host):
    # issue 24 row 15: the roll restarted a replica at the end of its drain whatever it still answered
    url = address(host)
    admin = f"/usr/local/sbin/cla2-haproxy-admin {SOCK}"
    before = {r: inspect(host, f"{NAME}-r{r}")["State"]["StartedAt"] for r in REPLICAS}
    pid = serve_pid(host, f"{NAME}-r0")
    codes = []
    client = threading.Thread(target=lambda: codes.append(chat(url, timeout=120).status_code), daemon=True)
    try:
        # the request goes to r0 (r1 takes none), whose serve process is held stopped: it stays in flight there
        host.check_output(f"{admin} 'set server replicas/r1 state maint'")
        host.check_output(f"kill -STOP {pid}")
        client.start()
        wait_until(lambda: scur(host, 0) == 1, 10, "the request is in flight on r0")
        res = play(inference_service_extra_args=["--max-batch-size", "5"], inference_service_drain_timeout=3)
        assert res.returncode != 0, res.stdout[-3000:]
        assert ("cla2-serve-r0: 1 request(s) still in flight after inference_service_drain_timeout (3s); "
                "it was not restarted") in res.stdout, res.stdout[-3000:]
        assert "Restart cla2-serve-r0" not in res.stdout and "Drain in HAProxy: cla2-serve-r1" not in res.stdout
        assert scur(host, 0) == 1
        out = host.check_output(f"{admin} 'show servers state replicas'")
        # srv_admin_state (field 7) of r0: 0, neither drain nor maint any more
        assert [line.split()[6] for line in out.splitlines() if line.split()[3:4] == ["r0"]] == ["0"], out
    finally:
        host.run(f"kill -CONT {pid}")
        host.run(f"{admin} 'set server replicas/r1 state ready'")
    client.join(60)
    assert codes == [200], codes
    for r in REPLICAS:
        assert inspect(host, f"{NAME}-r{r}")["State"]["StartedAt"] == before[r]
    wait_until(lambda: haproxy_status(host) == {"r0": "UP", "r1": "UP"}, 60, "both replicas UP again")
    # the next roll (the next test) takes the configuration to both replicas


def test_rolling_restart_on_a_new_configuration_fails_no_request(host):
    url = address(host)
    before = {r: inspect(host, f"{NAME}-r{r}")["State"]["StartedAt"] for r in REPLICAS}
    # a configuration the replicas do not run yet (the test may run twice on one converge)
    batch = "3" if "4" in inspect(host, f"{NAME}-r0")["Config"]["Cmd"] else "4"
    client = Client(url)
    client.start()
    time.sleep(2)
    res = play(inference_service_extra_args=["--max-batch-size", batch])
    time.sleep(2)
    codes = client.finish()
    assert res.returncode == 0, res.stdout[-4000:]
    assert "Drain in HAProxy: cla2-serve-r0" in res.stdout and "Drain in HAProxy: cla2-serve-r1" in res.stdout
    for r in REPLICAS:
        info = inspect(host, f"{NAME}-r{r}")
        assert info["State"]["StartedAt"] != before[r]
        args = info["Config"]["Cmd"]
        assert args[args.index("--max-batch-size") + 1] == batch
    assert haproxy_status(host) == {"r0": "UP", "r1": "UP"}
    assert len(codes) >= 10, codes
    assert set(codes) == {200}, [c for c in codes if c != 200]
    # the same configuration again changes nothing
    again = play(inference_service_extra_args=["--max-batch-size", batch])
    assert again.returncode == 0 and "changed=0" in again.stdout, again.stdout[-3000:]


def test_device_groups_that_do_not_match_the_host_are_refused_before_anything_changes(host):
    unit = host.file(f"/etc/systemd/system/{NAME}-r0.service").content_string
    res = play(inference_service_device_groups=[[0], [0, 2]])
    assert res.returncode != 0
    assert "device 2 is not on this host (no /dev/cambricon_dev2)" in res.stdout
    assert "device 0 is in 2 groups" in res.stdout
    res = play(inference_service_replicas=3)
    assert res.returncode != 0
    assert "inference_service_replicas 3 but there are 2 device groups [[0], [1]]" in res.stdout
    assert host.file(f"/etc/systemd/system/{NAME}-r0.service").content_string == unit
    assert not host.file(f"/etc/systemd/system/{NAME}-r2.service").exists
    assert haproxy_status(host) == {"r0": "UP", "r1": "UP"}


def test_a_model_that_does_not_load_fails_the_play_with_the_cause_and_the_endpoint_reports_it(host):
    # No plan can be made for it (config.json without the shape): the role says so and runs one replica on
    # every device, whose /health carries the cause; the endpoint passes that answer on (no replica is UP).
    host.check_output("mkdir -p /data/models/broken && echo '{\"model_type\": \"llama\"}' > /data/models/broken/config.json")
    try:
        res = play(inference_service_model="broken", inference_service_name="cla2-broken", inference_service_port=19400,
                   inference_service_device_groups=[], inference_service_health_timeout=60)
        assert res.returncode != 0
        assert "cla2 plan serve --model /data/models/broken" in res.stdout, res.stdout[-3000:]
        assert "cla2-broken replica r0 (devices 0,1)" in res.stdout and "did not load /data/models/broken" in res.stdout
        assert "config.json has no num_hidden_layers" in res.stdout
        health = requests.get(f"{address(host).rsplit(':', 1)[0]}:19400/health", timeout=30)
        assert health.status_code == 503
        assert health.json()["status"] == "error" and "config.json has no num_hidden_layers" in health.json()["error"]
    finally:
        host.run("systemctl disable --now cla2-broken cla2-broken-r0; rm -f /etc/systemd/system/cla2-broken*.service; "
                 "systemctl daemon-reload")
    # the other service on the host is untouched
    assert haproxy_status(host) == {"r0": "UP", "r1": "UP"}


def remove_service(host, name):
    host.run(f"systemctl disable --now {name} {name}-r0 {name}-r1; systemctl reset-failed {name}-r0 {name}-r1; "
             f"rm -f /etc/systemd/system/{name}*.service /etc/cla2/services/{name}.json; systemctl daemon-reload")


def test_a_host_without_mlu_device_nodes_is_refused_before_anything_changes(host):
    # a broken driver: no /dev/cambricon_dev<N> (here: patterns that find none) must not become a CPU service
    res = play(inference_service_name="cla2-nodev", inference_service_port=19420, inference_service_device="mlu",
               inference_service_device_patterns=["cambricon_ctl", "cambricon_none*"])
    assert res.returncode != 0
    assert "inference_service_device is mlu but no /dev/cambricon_dev<N> node was found" in res.stdout, res.stdout[-3000:]
    assert "Nothing was changed" in res.stdout
    assert not host.file("/etc/systemd/system/cla2-nodev.service").exists
    assert not host.file("/etc/systemd/system/cla2-nodev-r0.service").exists


def test_a_cpu_service_on_a_host_without_mlu_device_nodes_serves(host):
    # `make demo`'s sandbox host: no /dev/cambricon_dev<N> (here: patterns that find none) and the CPU. The plan's
    # group [0] names no node there: the replica runs with none instead of being refused
    try:
        res = play(inference_service_name="cla2-cpu", inference_service_port=19460, inference_service_device="cpu",
                   inference_service_device_patterns=["cambricon_none*"], inference_service_device_groups=[])
        assert res.returncode == 0, res.stdout[-3000:]
        assert host.run("docker exec cla2-cpu-r0 sh -c 'ls -1 /dev | grep ^cambricon'").stdout.split() == []
        answer = chat(f"{address(host).rsplit(':', 1)[0]}:19460", timeout=120)
        assert answer.status_code == 200, answer.text
    finally:
        remove_service(host, "cla2-cpu")


def test_a_replica_without_its_devices_fails_with_the_cause_instead_of_serving_from_the_cpu(host):
    # the nodes are there but torch sees no MLU (the sandbox's image: no torch_mlu): --device mlu is passed, so
    # the replica reports why it cannot load rather than falling back to the CPU and passing the smoke test
    try:
        res = play(inference_service_name="cla2-mlu", inference_service_port=19440, inference_service_device="mlu",
                   inference_service_device_groups=[[0]], inference_service_health_timeout=60)
        assert res.returncode != 0
        assert "cla2-mlu replica r0 (devices 0)" in res.stdout, res.stdout[-3000:]
        assert "--device mlu asked for, but torch_mlu is not importable" in res.stdout
        health = requests.get(f"{address(host).rsplit(':', 1)[0]}:19440/health", timeout=30)
        assert health.status_code == 503 and "torch_mlu" in health.json()["error"]
    finally:
        remove_service(host, "cla2-mlu")
    assert haproxy_status(host) == {"r0": "UP", "r1": "UP"}


def test_a_replica_that_keeps_dying_stops_at_the_start_limit(host):
    # systemd restarts a killed replica, but not without end: past the start limit it stays failed
    name = "cla2-limit"
    unit = f"{name}-r0"

    def serving():
        return host.run(f"docker top {unit} -eo pid,args | grep -q 'cla2 serve'").rc == 0

    try:
        res = play(inference_service_name=name, inference_service_port=19460, inference_service_device_groups=[[1]],
                   inference_service_start_limit_burst=2, inference_service_smoke_test=False,
                   inference_service_web=False)
        assert res.returncode == 0, res.stdout[-3000:]
        assert host.check_output(f"systemctl show -p StartLimitBurst --value {unit}") == "2"
        assert host.check_output(f"systemctl show -p StartLimitIntervalUSec --value {unit}") == "10min"
        host.check_output(f"systemctl reset-failed {unit}")  # the deploy's own starts no longer count
        restarts = int(host.check_output(f"systemctl show -p NRestarts --value {unit}"))
        for _ in range(2):  # 2 restarts within the limit
            host.check_output(f"kill -9 {serve_pid(host, unit)}")
            wait_until(lambda n=restarts: int(host.check_output(f"systemctl show -p NRestarts --value {unit}")) > n, 60,
                       "systemd restarts the killed replica")
            restarts += 1
            wait_until(serving, 60, "the restarted replica runs cla2 serve")
        host.check_output(f"kill -9 {serve_pid(host, unit)}")  # a 3rd start would pass the limit
        wait_until(lambda: host.check_output(f"systemctl is-active {unit} || true") == "failed", 60,
                   "systemd gives up at the start limit")
        time.sleep(5)
        assert host.check_output(f"systemctl is-active {unit} || true") == "failed"
        assert "Start request repeated too quickly" in host.check_output(f"journalctl -u {unit} --no-pager -n 20")
        assert not serving()
    finally:
        remove_service(host, name)
    assert haproxy_status(host) == {"r0": "UP", "r1": "UP"}


def slow_chat(url, wait, codes):
    """A chat completion whose body arrives ``wait`` s after its headers: in flight at the endpoint meanwhile."""
    ip, port = url.removeprefix("http://").split(":")
    body = json.dumps({"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {ip}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((ip, int(port)), timeout=60) as sock:
        sock.sendall(head + body[:5])
        time.sleep(wait)
        sock.sendall(body[5:])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    codes.append(int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else answer[:200])


def test_drain_for_a_reboot_lets_requests_finish_then_stops_and_ready_waits_for_the_replicas(host):
    # mlu_driver's rolling reboot runs these two around the reboot (mlu_driver_reboot_drain_command/_ready_command)
    url = address(host)
    ready = host.run("/usr/local/sbin/cla2-serve-ready")
    assert ready.rc == 0 and f"{NAME}: serving (2 replicas UP)" in ready.stdout, ready.stdout + ready.stderr
    codes = []
    # a request in flight when the drain begins (its body comes 5 s later): the drain must wait for its answer
    client = threading.Thread(target=slow_chat, args=(url, 5, codes))
    try:
        client.start()
        time.sleep(0.5)
        drained = host.run("/usr/local/sbin/cla2-serve-drain")
        assert drained.rc == 0, drained.stdout + drained.stderr
        assert "endpoint closed to new connections" in drained.stdout
        client.join(30)
        # answered whole, although the replicas stopped right after the drain
        assert codes == [200], codes
        for unit in [NAME] + [f"{NAME}-r{r}" for r in REPLICAS]:
            assert not host.service(unit).is_running and host.service(unit).is_enabled
        with pytest.raises(requests.ConnectionError):
            chat(url, timeout=10)  # a load balancer in front now sends this host nothing
        not_ready = host.run("/usr/local/sbin/cla2-serve-ready")
        assert not_ready.rc == 1 and f"{NAME}: not running" in not_ready.stdout
    finally:
        host.run(f"systemctl start {NAME}-r0 {NAME}-r1 {NAME}")  # what the boot does
    wait_until(lambda: host.run("/usr/local/sbin/cla2-serve-ready").rc == 0, 180, "the replicas serve again")
    assert chat(url).status_code == 200
