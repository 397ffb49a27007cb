"""Run docker-compose.yml's own commands as local processes, without Docker, and check the end.

    .venv/bin/python deploy/smoke.py [--speed max] [--keep DIR]

Every service of the compose file runs with its command as written, only its paths and ports
mapped to this machine: the broker is a local Mosquitto with deploy/mosquitto.conf, the ACL
and a password file of throwaway passwords, each on free ports; the shards and the servers
are `gmv` processes with the compose file's arguments; their health checks run as compose
would run them. Then the simulator plays the festival (at --speed, default max) and the
script checks its verdict, both servers' totals against what it published, and every health
check again. Exit 0 if all of that holds. It takes about a minute here at max speed.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
GMV = ROOT / ".venv" / "bin" / "gmv"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Smoke:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
        self.services: dict[str, dict] = self.compose["services"]
        script = (ROOT / "deploy" / "make-secrets.sh").read_text()
        users = re.search(r'^users="([^"]+)"', script, re.M)[1].split()
        self.secrets = work / "secrets"
        self.secrets.mkdir()
        for user in users:
            (self.secrets / user).write_text(f"smoke-{user}\n")
        (self.secrets / "control_token").write_text(os.urandom(24).hex() + "\n")
        passwd = work / "passwd"
        passwd.write_text("".join(f"{user}:smoke-{user}\n" for user in users))
        subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True)
        self.port, self.health_port = free_port(), free_port()
        self.ports: dict[str, int] = {}
        self.procs: dict[str, subprocess.Popen] = {}

    def broker_conf(self) -> Path:
        mounts = {v["target"]: v["source"] for v in self.services["broker"]["volumes"]
                  if isinstance(v, dict)}
        text = (ROOT / "deploy" / "mosquitto.conf").read_text()
        for target, source in mounts.items():
            local = self.work / "passwd" if "/secrets/" in source else ROOT / source
            text = text.replace(target, str(local))
        (self.work / "broker-data").mkdir()
        text = text.replace("/mosquitto/data/", f"{self.work}/broker-data/")
        text = text.replace("listener 1883 0.0.0.0", f"listener {self.port} 127.0.0.1")
        text = text.replace("listener 1880 127.0.0.1", f"listener {self.health_port} 127.0.0.1")
        text += f"user {pwd.getpwuid(os.getuid()).pw_name}\n"  # root would drop to mosquitto
        conf = self.work / "mosquitto.conf"
        conf.write_text(text)
        return conf

    def argv(self, name: str) -> list[str]:
        """The service's gmv command with this machine's paths and ports."""
        out = []
        for arg in self.services[name]["command"]:
            arg = arg.replace("mqtt://broker:1883", f"mqtt://127.0.0.1:{self.port}")
            arg = arg.replace("/run/secrets/", f"{self.secrets}/")
            arg = arg.replace("/app/data/", f"{ROOT}/data/")
            if arg.startswith("/data/"):
                (self.work / name).mkdir(exist_ok=True)
                arg = str(self.work / name / arg.removeprefix("/data/"))
            out.append(arg)
        for option, host in (("--metrics-port", "--metrics-host"), ("--port", "--host")):
            if option in out:
                self.ports[name] = free_port()
                out[out.index(option) + 1] = str(self.ports[name])
                out[out.index(host) + 1] = "127.0.0.1"
        return [str(GMV), *out]

    def start(self, name: str, argv: list[str]) -> None:
        log = open(self.work / f"{name}.log", "w")  # noqa: SIM115 - kept for the process
        self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT)

    def healthy(self, name: str) -> bool:
        """The service's health check, as compose runs it, on this machine's ports."""
        test = [a.replace("$$", "$").replace("/app/deploy/", f"{ROOT}/deploy/")
                for a in self.services[name]["healthcheck"]["test"][1:]]
        if test[0] == "python":
            test[0] = sys.executable
            test = [re.sub(r"^http://127\.0\.0\.1:\d+/",
                           f"http://127.0.0.1:{self.ports.get(name, 0)}/", a) for a in test]
            if "--mqtt" in test:
                test[-1] = str(self.port)
        else:  # the broker's mosquitto_sub on its loopback listener
            test[test.index("-p") + 1] = str(self.health_port)
        return subprocess.run(test, capture_output=True, timeout=30).returncode == 0

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs.items():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                print(f"{name}: killed after 20 s", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--speed", default="max", help="the simulator's --speed (default max)")
    parser.add_argument("--keep", type=Path, help="work directory to keep (logs, state)")
    args = parser.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="gmv-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    smoke = Smoke(work)
    # The gmv services (the monitoring profile's Prometheus and Grafana are not run here).
    long_running = [n for n, s in smoke.services.items()
                    if "build" in s and s["command"][0] != "simulate"]
    ok = True
    try:
        smoke.start("broker", ["mosquitto", "-c", str(smoke.broker_conf())])
        for name in long_running:
            smoke.start(name, smoke.argv(name))
        deadline = time.monotonic() + 60
        while not all(smoke.healthy(n) for n in ["broker", *long_running]):
            if time.monotonic() > deadline:
                print("not healthy within 60 s; logs in", work, file=sys.stderr)
                return 1
            time.sleep(1)
        print(f"healthy: broker, {', '.join(long_running)}", flush=True)
        sim = smoke.argv("simulator")
        sim[sim.index("--speed") + 1] = args.speed
        started = time.monotonic()
        done = subprocess.run([*sim, "--json"], capture_output=True, text=True)
        report = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"simulator: exit {done.returncode} after {time.monotonic() - started:.1f} s; "
              f"{report['verdict']['line']}")
        ok &= done.returncode == 0 and report["verdict"]["exact"]
        time.sleep(2)  # a server's next push
        for name in (n for n in long_running if smoke.services[n]["command"][0] == "serve"):
            url = f"http://127.0.0.1:{smoke.ports[name]}/api/totals"
            with urllib.request.urlopen(url, timeout=10) as response:
                view = json.loads(response.read())
            same = (view["gmv_cents"], view["orders"]) == (report["gmv_cents"], report["orders"])
            print(f"{name}: {view['orders']:,} orders, {view['gmv_cents']:,} cents "
                  f"({'as published' if same else 'NOT as published'})")
            ok &= same
        unhealthy = [n for n in ["broker", *long_running] if not smoke.healthy(n)]
        print("healthy at the end" if not unhealthy else f"unhealthy: {unhealthy}")
        ok &= not unhealthy
    finally:
        smoke.stop()
    codes = {name: proc.returncode for name, proc in smoke.procs.items()}
    print("stopped:", ", ".join(f"{n} {c}" for n, c in codes.items()))
    ok &= all(code == 0 for code in codes.values())
    print("smoke: ok" if ok else f"smoke: FAILED (logs in {work})")
    if ok and args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
