"""docker-compose.yml and deploy/ are checked here, since this machine has no Docker engine.

The compose file is read as YAML and every gmv service's command goes through the real CLI
parser; the broker's config and ACL are run on a real Mosquitto (the one of the tests).
"""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from gmv.cli import build_parser

from .conftest import MOSQUITTO, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
MOSQUITTO_SUB = "/usr/bin/mosquitto_sub"
MOSQUITTO_PASSWD = "/usr/bin/mosquitto_passwd"


def gmv_services(command: str | None = None) -> dict[str, dict]:
    """The services that run the gmv image, or those of them running `gmv COMMAND`."""
    return {name: s for name, s in SERVICES.items() if "build" in s
            and (command is None or s["command"][0] == command)}


def option(service: dict, name: str) -> str | None:
    """The value of `--name` in a service's command, as written (None if absent)."""
    command = service["command"]
    return command[command.index(name) + 1] if name in command else None


def secrets_of(service: dict) -> dict[str, str]:
    """The service's secrets: their name -> the file they come from, relative to ROOT."""
    return {name: COMPOSE["secrets"][name]["file"] for name in service.get("secrets", [])}


def logins() -> list[str]:
    """The MQTT users deploy/make-secrets.sh makes passwords for."""
    script = (DEPLOY / "make-secrets.sh").read_text()
    return re.search(r'^users="([^"]+)"', script, re.M)[1].split()


def documented_acl() -> str:
    """The `/etc/mosquitto/gmv.acl` block of docs/security.md, as tests/test_security.py
    reads it."""
    text = (ROOT / "docs" / "security.md").read_text()
    start = text.index("```conf\n# /etc/mosquitto/gmv.acl\n") + len("```conf\n")
    return text[start:text.index("```", start)]


def broker_mounts() -> dict[str, str]:
    """The broker's bind mounts: target in the container -> source, relative to ROOT."""
    return {v["target"]: v["source"] for v in SERVICES["broker"]["volumes"]
            if isinstance(v, dict) and v["type"] == "bind"}


def conf_values(text: str) -> dict[str, list[str]]:
    """Every value of each option in a Mosquitto config, in order."""
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            values.setdefault(key, []).append(value.strip())
    return values


# --- the services' commands -----------------------------------------------------------------

def test_every_gmv_service_command_parses_with_the_real_cli():
    """Each gmv service's command is a valid `gmv` command line (the parser of gmv/cli.py, as
    `gmv` runs it), on the compose broker, logged in with a password file from its secrets."""
    parser = build_parser()
    assert {s["command"][0] for s in gmv_services().values()} == \
        {"simulate", "aggregate", "serve"}
    for name, service in gmv_services().items():
        args = parser.parse_args(service["command"])
        assert args.broker == "mqtt://broker:1883", name
        assert args.username in logins(), name
        assert args.password_file == f"/run/secrets/{args.username}", name
        assert args.username in secrets_of(service), name
        assert args.control_token_file == "/run/secrets/control_token", name
        assert "control_token" in secrets_of(service), name
        assert service["image"] == "gmv-ticker:local" and service["build"] == ".", name


def compose_cli() -> list[str] | None:
    """A docker compose that can read the file without an engine: the plugin, or the
    standalone docker-compose (Debian's package), if either is installed."""
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=20).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.skipif(compose_cli() is None, reason="no docker compose installed")
def test_docker_compose_itself_accepts_the_file():
    """`docker compose config` (no engine needed) validates the file against the compose
    schema and resolves its anchors, interpolation and paths."""
    done = subprocess.run([*compose_cli(), "-f", str(ROOT / "docker-compose.yml"), "config",
                           "-q"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_the_secrets_are_the_files_make_secrets_writes():
    """Every secret comes from deploy/secrets/, which make-secrets.sh fills and git ignores."""
    script = (DEPLOY / "make-secrets.sh").read_text()
    for name, spec in COMPOSE["secrets"].items():
        file = Path(spec["file"])
        assert file.parent == Path("deploy/secrets"), name
        assert file.name in ("control.token", "grafana-admin.pw") or file.stem in logins(), name
        assert f"secrets/{file.name}" in script or file.stem in logins(), name
    assert "secrets/passwd" in script
    assert "deploy/secrets/" in (ROOT / ".gitignore").read_text().splitlines()
    assert "deploy/secrets" in (ROOT / ".dockerignore").read_text().splitlines()


def can_run_make_secrets() -> bool:
    try:
        pwd.getpwnam("mosquitto")  # the image's user, which gets the password file
    except KeyError:
        return False
    return os.getuid() == 0 and Path(MOSQUITTO_PASSWD).exists()


@pytest.mark.skipif(not can_run_make_secrets(),
                    reason="needs root, mosquitto_passwd and a mosquitto user")
def test_make_secrets_writes_every_login_once_and_keeps_them(tmp_path):
    """deploy/make-secrets.sh, its `docker run` of the broker image played by this machine's
    mosquitto_passwd: a random password per login, the token, Grafana's password, readable
    in a 0700 directory; the password file hashed, the broker's own, mode 600; run again,
    every password stays and the password file is made anew from them."""
    (tmp_path / "deploy").mkdir()
    script = tmp_path / "deploy" / "make-secrets.sh"
    script.write_text((DEPLOY / "make-secrets.sh").read_text())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "docker"  # docker run ... -v HOST:/secrets ... -c COMMAND
    fake.write_text(f"#!{sys.executable}\nimport subprocess, sys\nargs = sys.argv[1:]\n"
                    "host = args[args.index('-v') + 1].split(':')[0]\n"
                    "command = args[args.index('-c') + 1].replace('/secrets', host)\n"
                    "sys.exit(subprocess.run(['/bin/sh', '-c', command]).returncode)\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    secrets = tmp_path / "deploy" / "secrets"
    runs = []
    for _ in range(2):
        done = subprocess.run(["/bin/sh", str(script)], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        runs.append({f.name: f.read_text() for f in secrets.iterdir() if f.name != "passwd"})
        passwd = (secrets / "passwd").read_text().splitlines()
        assert [line.split(":")[0] for line in passwd] == logins()
        assert all(line.split(":", 1)[1].startswith("$7$") for line in passwd)  # hashed
        assert (secrets / "passwd").stat().st_uid == pwd.getpwnam("mosquitto").pw_uid
        assert (secrets / "passwd").stat().st_mode & 0o777 == 0o600
    assert runs[0] == runs[1]
    assert set(runs[0]) == {f"{user}.pw" for user in logins()} | {"control.token",
                                                                   "grafana-admin.pw"}
    assert len(set(runs[0].values())) == len(runs[0])  # each its own
    assert all(len(value) >= 32 for value in runs[0].values())
    assert secrets.stat().st_mode & 0o777 == 0o700
    assert all((secrets / name).stat().st_mode & 0o777 == 0o644 for name in runs[0])


def test_shards_cover_0_to_n_minus_1_once_and_servers_merge_all_of_them():
    """Shard ids are 0..N-1, each once; every server's --shards is that N; the simulator
    and every shard split the brands into the same P partitions, P >= N."""
    shards = gmv_services("aggregate")
    ids = [option(s, "--shard") for s in shards.values()]
    assert all(re.fullmatch(r"\d+/\d+", i) for i in ids), ids
    counts = {int(i.split("/")[1]) for i in ids}
    assert len(counts) == 1, ids
    n = counts.pop()
    assert sorted(int(i.split("/")[0]) for i in ids) == list(range(n))
    assert n == 3 and len(gmv_services("serve")) == 2
    for name, server in gmv_services("serve").items():
        assert int(option(server, "--shards")) == n, name
    partitions = {int(option(s, "--partitions") or n) for s in shards.values()}
    partitions |= {int(option(s, "--partitions")) for s in gmv_services("simulate").values()}
    assert len(partitions) == 1 and partitions.pop() >= n


def test_each_shard_logs_in_as_itself():
    """Shard K logs in as aggregator-K, the ACL's user that may publish totals/K and acks/K."""
    for name, service in gmv_services("aggregate").items():
        index = option(service, "--shard").split("/")[0]
        assert option(service, "--username") == f"aggregator-{index}", name


def test_each_shard_has_its_own_volume_and_checkpoint():
    """Each shard checkpoints to a path of its own on a named volume only it mounts."""
    owners: dict[str, str] = {}
    paths = set()
    for name, service in gmv_services("aggregate").items():
        checkpoint = option(service, "--checkpoint")
        assert checkpoint and checkpoint not in paths, name
        paths.add(checkpoint)
        mounts = [v.split(":") for v in service["volumes"]]
        holding = [(volume, target) for volume, target in mounts
                   if checkpoint.startswith(target.rstrip("/") + "/")]
        assert len(holding) == 1, f"{name}: {checkpoint} is on no volume"
        volume = holding[0][0]
        assert volume in COMPOSE["volumes"], name
        assert owners.setdefault(volume, name) == name, f"{volume}: {owners[volume]}, {name}"
        index, count = option(service, "--shard").split("/")
        assert f"{index}-of-{count}" in checkpoint, "the file names its partitioning"
    for name, service in SERVICES.items():
        for mount in service.get("volumes", []):
            volume = mount.split(":")[0] if isinstance(mount, str) else mount.get("source")
            assert volume not in owners or owners[volume] == name, f"{name} mounts {volume}"


def test_every_service_has_a_health_check_and_a_restart_policy():
    """Every service has a health check; all but the simulator restart by themselves, and
    every gmv service waits for a healthy broker; the one-shot simulator is never restarted
    (run again, it would publish the festival again on top of the totals)."""
    for name, service in SERVICES.items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and len(test) > 1, name
        restart = service["restart"]
        if name == "simulator":
            assert service["command"][0] == "simulate" and restart == "no"
            assert {"broker", *gmv_services("aggregate")} == set(service["depends_on"])
        else:
            assert restart in ("always", "unless-stopped", "on-failure"), name
        if name in gmv_services():
            assert service["depends_on"]["broker"] == {"condition": "service_healthy"}, name
        for condition in service.get("depends_on", {}).values():
            assert condition == {"condition": "service_healthy"}, name


def test_the_gmv_health_checks_ask_the_port_each_service_serves():
    """A shard's check reads its /metrics on --metrics-port, a server's /metrics on its
    HTTP --port (the page's), each asking that it holds its broker connection; the
    simulator's checks its connection to the broker; each with the script the image holds."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY deploy/healthcheck.py deploy/healthcheck.py" in dockerfile
    for name, service in gmv_services().items():
        test = service["healthcheck"]["test"]
        assert test[1:3] == ["python", "/app/deploy/healthcheck.py"], name
        command = service["command"][0]
        if command == "aggregate":
            port = option(service, "--metrics-port")
            assert test[3:] == [f"http://127.0.0.1:{port}/metrics",
                                "gmv_aggregator_broker_connected=1"], name
        elif command == "serve":
            port = option(service, "--port")
            assert test[3:] == [f"http://127.0.0.1:{port}/metrics",
                                "gmv_server_broker_connected=1"], name
            assert service["ports"] == [f"127.0.0.1:{port}:{port}"], name
        else:
            assert test[3:] == ["--mqtt", "1883"], name


def test_the_monitoring_profile_scrapes_every_shard_and_server():
    """`--profile monitoring` adds Prometheus, scraping each shard's --metrics-port and each
    server's HTTP port (deploy/prometheus.yml), and Grafana with deploy/grafana-dashboard.json
    on that Prometheus; without the profile neither starts."""
    monitoring = {n for n, s in SERVICES.items() if "monitoring" in s.get("profiles", [])}
    assert monitoring == {"prometheus", "grafana"}
    assert all("profiles" not in s for n, s in SERVICES.items() if n not in monitoring)
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    mounted = SERVICES["prometheus"]["volumes"][0]
    assert (mounted["source"], mounted["target"]) == ("./deploy/prometheus.yml",
                                                      "/etc/prometheus/prometheus.yml")
    targets = {job["job_name"]: sorted(t for c in job["static_configs"] for t in c["targets"])
               for job in scrape["scrape_configs"]}
    assert targets == {
        "gmv-aggregator": sorted(f"{n}:{option(s, '--metrics-port')}"
                                 for n, s in gmv_services("aggregate").items()),
        "gmv-server": sorted(f"{n}:{option(s, '--port')}"
                             for n, s in gmv_services("serve").items()),
    }
    for name, service in gmv_services("aggregate").items():
        assert option(service, "--metrics-host") == "0.0.0.0", name  # reachable in the network
    grafana = {v["target"]: v["source"] for v in SERVICES["grafana"]["volumes"]
               if isinstance(v, dict)}
    assert grafana["/var/lib/grafana/dashboards/gmv.json"] == "./deploy/grafana-dashboard.json"
    for source in grafana.values():
        assert (ROOT / source).is_file(), source
    source = yaml.safe_load((DEPLOY / "grafana" / "datasource.yml").read_text())["datasources"]
    assert [d["url"] for d in source] == ["http://prometheus:9090"]
    assert SERVICES["prometheus"]["ports"] == ["127.0.0.1:9090:9090"]
    provider = yaml.safe_load((DEPLOY / "grafana" / "dashboards.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_the_health_checks_ask_for_documented_metrics():
    """The metric values the health checks require are ones docs/metrics.md documents, so a
    renamed metric fails here instead of making every shard and server unhealthy."""
    documented = set(re.findall(r"^\| `(gmv_\w+)` \|", (ROOT / "docs" / "metrics.md").read_text(),
                                re.M))
    asked = {arg.partition("=")[0] for service in gmv_services().values()
             for arg in service["healthcheck"]["test"][4:] if "=" in arg}
    assert asked == {"gmv_aggregator_broker_connected", "gmv_server_broker_connected"}
    assert asked <= documented


def test_the_image_holds_every_part_and_the_reference_file():
    """The Dockerfile copies the packages, the page and the data and installs them; the
    --reference file the services name is in data/, which it copies to /app/data."""
    text = (ROOT / "Dockerfile").read_text()
    for part in ("gmv", "ticker", "simulator", "web", "data"):
        assert re.search(rf"^COPY {part} {part}$", text, re.M), part
    assert re.search(r"^RUN pip install .*-e \.", text, re.M)
    assert "WORKDIR /app" in text and 'ENTRYPOINT ["gmv"]' in text
    references = {option(s, "--reference") for s in gmv_services().values()} - {None}
    assert len(references) == 1
    reference = references.pop()
    assert reference.startswith("/app/data/")
    assert (ROOT / reference.removeprefix("/app/")).is_file(), reference



def test_the_simulator_plays_once_per_deployment(tmp_path):
    """Its entrypoint runs `gmv simulate ...` the first time only: run again (a later
    `docker compose up` starts the exited container), it says why and exits 0 instead of
    publishing the festival a second time on top of the totals."""
    service = SERVICES["simulator"]
    assert service["volumes"] == ["simulator-data:/data"]
    assert "simulator-data" in COMPOSE["volumes"]
    shell, flag, script, name = service["entrypoint"]
    assert (shell, flag) == ("/bin/sh", "-c")
    script = script.replace("$$", "$").replace("/data/", f"{tmp_path}/")  # as compose hands it
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "gmv"
    fake.write_text(f'#!/bin/sh\necho "gmv $*" >> {tmp_path}/ran\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    for _ in range(2):
        done = subprocess.run([shell, flag, script, name, *service["command"]], env=env,
                              capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done
    assert (tmp_path / "ran").read_text() == "gmv " + " ".join(service["command"]) + "\n"
    assert "has played its festival already" in done.stdout

# --- the broker -----------------------------------------------------------------------------

def test_the_broker_mounts_the_config_acl_and_password_file_of_deploy():
    """The broker's config, ACL and health-check ACL are files in deploy/, mounted where the
    config says; the password file is the one make-secrets.sh writes; its data is a volume."""
    mounts = broker_mounts()
    conf_source = mounts["/mosquitto/config/mosquitto.conf"]
    assert conf_source == "./deploy/mosquitto.conf"
    conf = conf_values((ROOT / conf_source).read_text())
    for target in conf["acl_file"] + conf["password_file"]:
        source = mounts[target]
        assert source.startswith("./deploy/"), target
        if "/secrets/" not in source:
            assert (ROOT / source).is_file(), source
    assert mounts[conf["password_file"][0]] == "./deploy/secrets/passwd"
    assert mounts[conf["acl_file"][0]] == "./deploy/gmv.acl"
    data = [v for v in SERVICES["broker"]["volumes"] if isinstance(v, str)]
    assert data == [f"broker-data:{conf['persistence_location'][0].rstrip('/')}"]
    assert SERVICES["broker"]["image"] == "eclipse-mosquitto:2"
    assert SERVICES["broker"]["ports"] == ["127.0.0.1:1884:1883"]


def test_the_broker_queues_hold_an_outage():
    """Persistence on, and room for what the shards take: batches in flight above every
    shard's --max-unacked, a queue far above Mosquitto's default of 1000 (docs/reliability.md)."""
    conf = conf_values((DEPLOY / "mosquitto.conf").read_text())
    assert conf["persistence"] == ["true"]
    assert int(conf["autosave_interval"][0]) <= 60
    inflight = int(conf["max_inflight_messages"][0])
    for name, service in gmv_services("aggregate").items():
        assert int(option(service, "--max-unacked")) < inflight, name
    assert int(conf["max_queued_messages"][0]) >= 100_000
    assert int(conf["max_queued_bytes"][0]) >= 256 << 20
    assert conf["allow_anonymous"] == ["false", "true"]  # anonymous: the loopback check only
    assert conf["listener"] == ["1883 0.0.0.0", "1880 127.0.0.1"]


def test_the_deployed_acl_is_the_documented_one():
    """deploy/gmv.acl is byte for byte the ACL of docs/security.md, so the docs and the
    deployment cannot drift; it has a user for every login of the compose file, and shard K's
    user writes totals/K and acks/K/# only."""
    acl = (DEPLOY / "gmv.acl").read_text()
    assert acl == documented_acl()
    users = re.findall(r"^user (\S+)$", acl, re.M)
    assert set(logins()) <= set(users)
    blocks = dict(re.findall(r"^user (\S+)\n((?:topic .*\n)+)", acl, re.M))
    for service in gmv_services("aggregate").values():
        index = option(service, "--shard").split("/")[0]
        writes = re.findall(r"^topic write (\S+)$", blocks[f"aggregator-{index}"], re.M)
        assert writes == [f"gmv/v1/totals/{index}", f"gmv/v1/acks/{index}/#",
                          "gmv/v1/rejected/#"]


@contextlib.contextmanager
def deploy_broker(tmp_path: Path, passwords: dict[str, str], *, acl: str = "",
                  conf: str = "", port: int | None = None):
    """Mosquitto with deploy/mosquitto.conf as compose mounts it: the container's paths
    mapped into tmp_path, its two listeners on free ports; `acl` and `conf` appended to
    deploy/gmv.acl and to the config. Yields (port, health port)."""
    port, health = port or free_port(), free_port()
    mounts = broker_mounts()
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "data").mkdir()
    for target, source in mounts.items():
        if target.endswith(".acl"):
            text = (ROOT / source).read_text() + (acl if target.endswith("gmv.acl") else "")
            (tmp_path / Path(target).name).write_text(text)
    passwd = tmp_path / "passwd"
    passwd.write_text("".join(f"{user}:{pw}\n" for user, pw in passwords.items()))
    subprocess.run([MOSQUITTO_PASSWD, "-U", str(passwd)], check=True, timeout=10)
    text = (DEPLOY / "mosquitto.conf").read_text()
    text = text.replace("/mosquitto/config/", f"{tmp_path}/").replace(
        "/mosquitto/data/", f"{tmp_path}/data/")
    text = text.replace("listener 1883 0.0.0.0", f"listener {port} 127.0.0.1").replace(
        "listener 1880 127.0.0.1", f"listener {health} 127.0.0.1")
    # Started as root, Mosquitto would drop to the `mosquitto` user (the image's does).
    text += f"user {pwd.getpwuid(os.getuid()).pw_name}\n" + conf
    (tmp_path / "mosquitto.conf").write_text(text)
    proc = subprocess.Popen([MOSQUITTO, "-c", str(tmp_path / "mosquitto.conf")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        wait_for_port(health)
        yield port, health
    finally:
        proc.kill()
        output = proc.communicate(timeout=10)[0].decode(errors="replace")
        assert "Error" not in output, output


def subscriber(port: int, topic: str, user: str | None = None, pw: str = "") \
        -> subprocess.Popen:
    """The first message on `topic` (it exits then), or nothing within a second."""
    login = ["-u", user, "-P", pw] if user else []
    return subprocess.Popen([MOSQUITTO_SUB, "-h", "127.0.0.1", "-p", str(port), *login,
                             "-t", topic, "-v", "-C", "1", "-W", "1"],
                            stdout=subprocess.PIPE, text=True)


def mqtt(tool: str, port: int, *args: str, user: str | None = None, pw: str = "") \
        -> subprocess.CompletedProcess:
    login = ["-u", user, "-P", pw] if user else []
    return subprocess.run([f"/usr/bin/mosquitto_{tool}", "-h", "127.0.0.1", "-p", str(port),
                           *login, *args], capture_output=True, text=True, timeout=10)


@pytest.mark.skipif(not (Path(MOSQUITTO).exists() and Path(MOSQUITTO_SUB).exists()
                         and Path(MOSQUITTO_PASSWD).exists()), reason="needs Mosquitto")
def test_the_deploy_broker_config_runs_on_mosquitto_with_the_logins_and_the_acl(tmp_path):
    """deploy/mosquitto.conf starts on a real Mosquitto 2; the broker's own health check
    passes; anonymous clients are refused on the main listener; with the ACL, shard 1's
    login publishes totals/1 but not totals/0, and sim-1 gets partition 2's acks."""
    passwords = {user: f"pw-{user}" for user in logins()}
    with deploy_broker(tmp_path, passwords) as (port, health):
        check = SERVICES["broker"]["healthcheck"]["test"][1:]
        check = [a.replace("$$", "$") for a in check]
        check[check.index("-p") + 1] = str(health)
        result = subprocess.run(check, capture_output=True, text=True, timeout=10)
        assert result.returncode == 0 and "seconds" in result.stdout, result
        refused = mqtt("pub", port, "-t", "gmv/v1/totals/0", "-m", "{}")
        assert refused.returncode != 0 and "not authorised" in refused.stderr.lower()

        def login(user: str) -> dict[str, str]:
            return {"user": user, "pw": passwords[user]}

        def publish(user: str, topic: str, *flags: str) -> None:
            # A denied publish is acknowledged all the same, and dropped.
            done = mqtt("pub", port, "-q", "1", "-t", topic, "-m", "x", *flags,
                        user=user, pw=passwords[user])
            assert done.returncode == 0, done

        # Retained, as the shards publish them; the denied one first, so it would be first.
        publish("aggregator-1", "gmv/v1/totals/0", "-r")
        publish("aggregator-1", "gmv/v1/totals/1", "-r")
        publish("aggregator-1", "gmv/v1/acks/0/sim-1", "-r")
        publish("aggregator-1", "gmv/v1/acks/1/sim-1/2", "-r")
        publish("aggregator-0", "gmv/v1/acks/0/sim-2", "-r")
        reads = {
            "totals, as the servers read them": subscriber(port, "gmv/v1/totals/+",
                                                           **login("ticker")),
            # What gmv simulate subscribes to: acks/+/{producer}/#, partition 0 and p > 0.
            "sim-1's acks": subscriber(port, "gmv/v1/acks/+/sim-1/#", **login("sim-1")),
            "another producer's acks": subscriber(port, "gmv/v1/acks/+/sim-2/#",
                                                  **login("sim-1")),
            "the health check's": subscriber(health, "gmv/v1/totals/+"),
        }
        got = {what: proc.communicate(timeout=10)[0].strip() for what, proc in reads.items()}
        assert got == {"totals, as the servers read them": "gmv/v1/totals/1 x",
                       "sim-1's acks": "gmv/v1/acks/1/sim-1/2 x",
                       "another producer's acks": "",
                       "the health check's": ""}


@pytest.mark.skipif(not (Path(MOSQUITTO).exists() and Path(MOSQUITTO_SUB).exists()
                         and Path(MOSQUITTO_PASSWD).exists()), reason="needs Mosquitto")
def test_the_example_bridge_carries_batches_one_way_and_acks_the_other(tmp_path):
    """deploy/bridge.conf on a producers' broker, bridged to a consumers' broker, both with
    the deploy config, the ACL and deploy/bridge.acl: a producer's retained announcement of
    partition 2 reaches the shards' side, and a shard's retained ack reaches the producer."""
    passwords = {user: f"pw-{user}" for user in logins()} | {"gmv-bridge": "pw-bridge"}
    acl = "\n" + (DEPLOY / "bridge.acl").read_text()
    consumers_port = free_port()
    bridge = (DEPLOY / "bridge.conf").read_text()
    assert "address consumers.example.internal:8883" in bridge
    bridge = bridge.replace("address consumers.example.internal:8883",
                            f"address 127.0.0.1:{consumers_port}")
    bridge = bridge.replace("remote_password CHANGE-ME", "remote_password pw-bridge")
    bridge = re.sub(r"^bridge_cafile .*\n", "", bridge, flags=re.M)  # plain MQTT here
    with deploy_broker(tmp_path / "consumers", passwords, acl=acl, port=consumers_port), \
            deploy_broker(tmp_path / "producers", passwords, acl=acl, conf=bridge) \
            as (producers, producers_health):
        def publish(port: int, user: str, topic: str) -> None:
            done = mqtt("pub", port, "-q", "1", "-r", "-t", topic, "-m", "x", user=user,
                        pw=passwords[user])
            assert done.returncode == 0, done

        publish(producers, "sim-1", "gmv/v1/producers/sim-1/2")
        publish(consumers_port, "aggregator-2", "gmv/v1/acks/2/sim-1/2")
        deadline = time.monotonic() + 5
        while True:  # the bridge connects within a moment of the brokers' start
            announced = subscriber(consumers_port, "gmv/v1/producers/#", "aggregator-0",
                                   passwords["aggregator-0"]).communicate(timeout=10)[0]
            acked = subscriber(producers, "gmv/v1/acks/+/sim-1/#", "sim-1",
                               passwords["sim-1"]).communicate(timeout=10)[0]
            if (announced and acked) or time.monotonic() > deadline:
                break
        assert announced.strip() == "gmv/v1/producers/sim-1/2 x"
        assert acked.strip() == "gmv/v1/acks/2/sim-1/2 x"
        # The bridge's retained notification, 1 once connected, as the health listener sees it.
        state = subscriber(producers_health, "$SYS/broker/connection/gmv-bridge-producers-1/state")
        assert state.communicate(timeout=10)[0].strip().endswith(" 1")


# --- deploy/healthcheck.py ------------------------------------------------------------------

def load_healthcheck():
    """deploy/healthcheck.py as a module (it is a script in the image, not a package)."""
    spec = importlib.util.spec_from_file_location("healthcheck", HEALTHCHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_healthcheck_passes_on_200_and_fails_with_a_reason_otherwise(capsys):
    """The gmv containers' check: 200 (with the metric values asked for) is healthy; a 404, a
    closed port or another value is not, with one line naming the URL and what is wrong."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the name http.server calls
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()
            self.wfile.write(b"# TYPE gmv_up gauge\ngmv_up 1.0\ngmv_down 0.0\n")

        def log_message(self, *args):
            pass

    check = load_healthcheck().main
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert check([f"{base}/metrics"]) == 0
        assert check([f"{base}/metrics", "gmv_up=1"]) == 0
        assert check([f"{base}/metrics", "gmv_up=1", "gmv_down=1"]) == 1
        assert "gmv_down is 0, not 1" in capsys.readouterr().err
        assert check([f"{base}/metrics", "gmv_gone=1"]) == 1
        assert "gmv_gone is missing" in capsys.readouterr().err
        assert check([f"{base}/nothing"]) == 1
        assert "404" in capsys.readouterr().err
        assert check([f"http://127.0.0.1:{free_port()}/"]) == 1
        assert capsys.readouterr().err.startswith("unhealthy: http://127.0.0.1:")
    finally:
        server.shutdown()
        server.server_close()
    usage = subprocess.run([sys.executable, str(HEALTHCHECK)], capture_output=True, text=True,
                           timeout=20)  # as the image runs it: a script
    assert usage.returncode == 2 and usage.stderr.startswith("usage: healthcheck.py")


def test_the_mqtt_healthcheck_sees_an_established_connection_to_the_port():
    """The simulator's check: healthy while a TCP connection to the broker's port is up."""
    connected_to = load_healthcheck().connected_to
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert connected_to(port) == f"no established connection to port {port}"
        with socket.create_connection(("127.0.0.1", port)), listener.accept()[0]:
            assert connected_to(port) is None


@pytest.mark.skipif(not Path(MOSQUITTO_PASSWD).exists(), reason="needs mosquitto_passwd")
def test_the_smoke_script_maps_every_gmv_service_onto_this_machine(tmp_path):
    """deploy/smoke.py (run by hand: about a minute) keeps up with the compose file: each gmv
    service's command, mapped onto this machine, still parses and names no container path."""
    spec = importlib.util.spec_from_file_location("smoke", DEPLOY / "smoke.py")
    smoke_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke_module)
    smoke = smoke_module.Smoke(tmp_path)
    smoke.broker_conf()
    parser = build_parser()
    for name in gmv_services():
        argv = smoke.argv(name)
        parser.parse_args(argv[1:])
        text = " ".join(argv)
        assert "broker:1883" not in text and "/run/secrets" not in text, name
        assert " /data/" not in text and "/app/" not in text, name


# --- docs -----------------------------------------------------------------------------------

def test_the_deploy_doc_names_what_the_compose_file_runs():
    """docs/deploy.md shows the set-up commands and every service of the compose file."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert "deploy/make-secrets.sh" in text and "docker compose up" in text
    for name in SERVICES:
        assert f"`{name}`" in text, name
    blocks = "\n".join(re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S))
    for example in re.findall(r"^ *(gmv (?:aggregate|serve|simulate) .*)$", blocks, re.M):
        build_parser().parse_args(shlex.split(example.split(" #")[0])[1:])
