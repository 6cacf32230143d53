"""The round protocol on Flower: a node answers the server's messages from its persisted state, the server strategy
keeps what passes its checks, and a simulation gives the Accelerate run's numbers."""

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml
from federated_setup import tiny_overrides, write_tiny_world
from flwr.app import ConfigRecord, RecordDict

from comigs_hf.cli import main as comigs
from comigs_hf.client_state import initial_shared_state
from comigs_hf.config import build_strategy, config_to_dict, load_config
from comigs_hf.flower_app import build_node, node_settings
from comigs_hf.outputs import TEST_FIGURES
from comigs_hf.recipe import main as accelerate_run
from comigs_hf.server import InvalidUpdate, aggregate_updates, sample_clients
from comigs_hf.tables import free_port
from comigs_hf.trainer import ClientUpdate
from comigs_hf.transports.flower import (
    CoMiGSStrategy,
    FederationIncomplete,
    evaluation_to_reply,
    identity_to_reply,
    shared_to_arrays,
    update_from_reply,
    update_to_reply,
)

CLIENTS = "[cooking,finance,science,sports]"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_tiny_world(tmp_path_factory.mktemp("flower-world"))


def _recipe(world, output_dir: Path, **extra):
    return load_config(None, tiny_overrides(*world, output_dir, **{"data.client_values": CLIENTS, **extra}))


def _train_message(node, round_index: int, shared: dict, evaluate: bool = False) -> RecordDict:
    config = ConfigRecord({"round": round_index, "evaluate": evaluate})
    return RecordDict({"arrays": shared_to_arrays(shared), "config": config})


def _global(node, cfg) -> dict:
    spec = node.client.spec
    return initial_shared_state(node.client.model, spec.strategy, spec.num_specialists, cfg.seed, spec.top_k)


def _saved(node, round_index: int) -> dict:
    return torch.load(node.client.directory / f"round-{round_index}.pt", weights_only=True)


# ---- the node ------------------------------------------------------------------------------------------------------
def test_node_sends_the_saved_update_again_for_a_round_it_already_trained(world, tmp_path):
    cfg = _recipe(world, tmp_path / "out")
    node = build_node(cfg, 1, tmp_path / "nodes")
    shared = _global(node, cfg)
    first = update_from_reply(node.train(_train_message(node, 1, shared, evaluate=True)), shared, 4, 1)
    saved = _saved(node, 1)
    again = update_from_reply(node.train(_train_message(node, 1, shared, evaluate=True)), shared, 4, 1)
    assert _saved(node, 1)["state"]["expert_steps"] == saved["state"]["expert_steps"]
    assert first[1] == again[1] == "finance" and first[2] == again[2] and "test_ppl" in first[2]
    assert first[0].metrics == again[0].metrics
    assert all(torch.equal(first[0].shared[key], again[0].shared[key]) for key in shared)


def test_node_that_sat_out_rounds_trains_from_the_global_it_receives(world, tmp_path):
    cfg = _recipe(world, tmp_path / "out")
    node = build_node(cfg, 0, tmp_path / "nodes")
    shared = _global(node, cfg)
    update_from_reply(node.train(_train_message(node, 1, shared)), shared, 4, 1)
    update, _, evaluation = update_from_reply(node.train(_train_message(node, 3, shared)), shared, 4, 3)
    assert update.round == 3 and evaluation is None
    assert node.client.saved_rounds() == [3, 1] and _saved(node, 3)["round"] == 3
    with pytest.raises(ValueError, match="trained up to round 3"):
        node.train(_train_message(node, 2, shared))


def test_node_refuses_a_state_saved_by_another_federation(world, tmp_path):
    cfg = _recipe(world, tmp_path / "out")
    node = build_node(cfg, 2, tmp_path / "nodes")
    shared = _global(node, cfg)
    node.train(_train_message(node, 1, shared))
    other = build_node(_recipe(world, tmp_path / "out", seed=7), 2, tmp_path / "nodes")
    with pytest.raises(ValueError, match="another federation or recipe: seed=0, now 7"):
        other.train(_train_message(other, 2, shared))


def test_node_refuses_a_global_that_does_not_fit_its_layout(world, tmp_path):
    cfg = _recipe(world, tmp_path / "out")
    node = build_node(cfg, 3, tmp_path / "nodes")
    shared = _global(node, cfg)
    key = sorted(shared)[0]
    wrong = {**shared, key: torch.zeros(shared[key].shape[0] + 1, *shared[key].shape[1:])}
    with pytest.raises(InvalidUpdate, match="'server'.*declares"):
        node.train(_train_message(node, 1, wrong))
    poisoned = {**shared, key: torch.full_like(shared[key], float("nan"))}
    with pytest.raises(InvalidUpdate, match="NaN"):
        node.train(_train_message(node, 1, poisoned))
    assert not node.client.directory.exists()  # nothing trained, nothing saved


def test_node_config_may_point_at_its_own_data_and_nothing_else(world, tmp_path):
    cfg = _recipe(world, tmp_path / "out")
    own, client, state_dir = node_settings(cfg, {"partition-id": 2, "overrides": "data.max_records_per_client=30"})
    assert (own.data.max_records_per_client, client, state_dir) == (30, 2, tmp_path / "out" / "nodes")
    assert own.training == cfg.training and own.model == cfg.model
    with pytest.raises(ValueError, match="data.\\* keys and output_dir only.*training.local_steps=9"):
        node_settings(cfg, {"partition-id": 0, "overrides": "training.local_steps=9"})
    with pytest.raises(ValueError, match="no partition-id"):
        node_settings(cfg, {})
    with pytest.raises(ValueError, match="partition-id must be an integer >= 0"):
        node_settings(cfg, {"partition-id": -1})


def test_a_node_process_trains_without_importing_peft_or_every_causal_lm_of_transformers(world, tmp_path):
    # a deployed node pays its imports on every message (a fresh ClientApp process each): peft pulls in bitsandbytes,
    # and importing every causal LM class of transformers lets some of them look for kernels on the Hub
    recipe = _recipe_file(world, tmp_path, tmp_path / "out", save_models="false")
    script = f"""
import sys
from comigs_hf.config import load_config
from comigs_hf.flower_app import build_node
from comigs_hf.client_state import initial_shared_state
from flwr.app import ConfigRecord, RecordDict
from comigs_hf.transports.flower import shared_to_arrays
cfg = load_config({str(recipe)!r}, [])
node = build_node(cfg, 1, {str(tmp_path / "state")!r})
spec = node.client.spec
shared = initial_shared_state(node.client.model, spec.strategy, spec.num_specialists, cfg.seed, spec.top_k)
settings = ConfigRecord({{"round": 1, "evaluate": False}})
node.train(RecordDict({{"arrays": shared_to_arrays(shared), "config": settings}}))
print(sorted(name for name in ("peft", "bitsandbytes", "transformers.models.gpt_neo.modeling_gpt_neo")
             if name in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "state" / "client-1" / "round-1.pt").is_file()


# ---- the server strategy -------------------------------------------------------------------------------------------
@dataclass
class _Reply:
    """What the strategy reads of a Flower reply: its sender, its content, or its error."""

    src_node_id: int
    content: RecordDict | None = None
    reason: str | None = None
    metadata: object = field(init=False)
    error: object = field(init=False)

    def __post_init__(self):
        self.metadata = self
        self.error = self

    def has_error(self) -> bool:
        return self.reason is not None


REFERENCE = {
    "model.layers.0.mlp.generalist_0.lora_A.weight": torch.zeros(2, 4),
    "model.layers.0.mlp.generalist_0.lora_B.weight": torch.zeros(4, 2),
}


def _update(client_id: int, value: float, round_index: int = 1) -> ClientUpdate:
    shared = {key: torch.full_like(tensor, value) for key, tensor in REFERENCE.items()}
    return ClientUpdate(
        client_id, round_index, shared, 100 * (client_id + 1), {"train_loss": 3.0, "router_loss": None}
    )


def _strategy(**kwargs) -> CoMiGSStrategy:
    cfg = load_config(None, ["strategy=comigs"])
    server = CoMiGSStrategy(build_strategy(cfg), REFERENCE, 4, rounds=2, eval_every=1, **kwargs)
    server._sent = {10 + client: client for client in range(4)}  # node 10 + i was sent client i's round
    return server


def test_strategy_drops_a_hostile_update_and_aggregates_the_others_in_client_order():
    server = _strategy(min_train_nodes=3)
    honest = [_update(client, float(client)) for client in (2, 0, 1)]
    replies = [_Reply(10 + u.client_id, update_to_reply(u, f"c{u.client_id}")) for u in honest]
    replies.append(_Reply(13, update_to_reply(_update(3, 5e6), "c3")))  # beyond any trained value
    arrays, totals = server.aggregate_train(1, replies)
    expected = aggregate_updates(server.strategy, sorted(honest, key=lambda u: u.client_id), REFERENCE)
    for key, tensor in expected.items():
        assert torch.equal(server.shared[key], tensor)
    assert [row["client_id"] for row in server._round["clients"]] == [0, 1, 2] and totals["clients"] == 3


def test_strategy_refuses_a_node_replying_as_another_client():
    server = _strategy(min_train_nodes=3)
    replies = [_Reply(10 + c, update_to_reply(_update(c, 1.0), "c")) for c in range(3)]
    replies.append(_Reply(13, update_to_reply(_update(0, 9.0), "impostor")))  # node of client 3 sends as client 0
    server.aggregate_train(1, replies)
    assert [row["client_id"] for row in server._round["clients"]] == [0, 1, 2]
    assert torch.equal(server.shared[sorted(REFERENCE)[0]], torch.ones(2, 4))


def test_a_round_with_fewer_usable_updates_than_min_train_nodes_fails_naming_who_is_missing():
    server = _strategy()  # every client by default
    replies = [_Reply(10 + c, update_to_reply(_update(c, 1.0), "c")) for c in range(2)]
    replies.append(_Reply(12, reason="the ClientApp raised"))
    with pytest.raises(FederationIncomplete, match=r"2 usable updates \(clients \[0, 1\]\).*min_train_nodes=4"):
        server.aggregate_train(1, replies)


def test_strategy_refuses_a_minimum_beyond_the_federation():
    with pytest.raises(ValueError, match=r"min_train_nodes must be in \[1, 4\]"):
        _strategy(min_train_nodes=5)
    with pytest.raises(ValueError, match=r"min_train_nodes must be in \[1, 2\] \(the clients asked each round\)"):
        _strategy(min_train_nodes=3, clients_per_round=2)


class _Grid:
    """The nodes 10 + i, each serving client i, as the strategy sees them through a grid."""

    def __init__(self, clients=range(4)):
        self.clients = list(clients)

    def get_node_ids(self):
        return [10 + client for client in self.clients]

    def send_and_receive(self, messages, timeout):  # only the strategy's query messages go through here
        return [_Reply(m.metadata.dst_node_id, identity_to_reply(m.metadata.dst_node_id - 10, "c")) for m in messages]


def test_strategy_asks_the_drawn_clients_to_train_and_evaluates_every_node(in_a_run):
    server = CoMiGSStrategy(
        build_strategy(load_config(None, [])), REFERENCE, 4, rounds=3, eval_every=1, clients_per_round=2, seed=5
    )
    assert server.min_train_nodes == 2  # every client asked, by default
    grid, arrays, config = _Grid(), shared_to_arrays(REFERENCE), ConfigRecord({})
    for round_index in (1, 2, 3):
        asked = sample_clients(4, 2, 5, round_index)
        sent = [m.metadata.dst_node_id for m in server.configure_train(round_index, arrays, config, grid)]
        assert sent == [10 + client for client in asked]
        replies = [_Reply(10 + c, update_to_reply(_update(c, 1.0, round_index), "c")) for c in asked]
        server.aggregate_train(round_index, replies)
        evaluated = server.configure_evaluate(round_index, arrays, config, grid)
        assert sorted(m.metadata.dst_node_id for m in evaluated) == [10, 11, 12, 13]
        metrics = {"test_loss": 1.0, "test_ppl": 2.7}
        server.aggregate_evaluate(
            round_index, [_Reply(10 + c, evaluation_to_reply(c, round_index, "c", metrics)) for c in range(4)]
        )
        rows = server.records[-1]["clients"]
        assert [row["client_id"] for row in rows] == [0, 1, 2, 3] and all(row["test_ppl"] == 2.7 for row in rows)
        assert [row["client_id"] for row in rows if row["trained"]] == asked


def test_strategy_skips_an_asked_client_whose_node_is_gone_and_goes_on_with_enough_updates(in_a_run, caplog):
    server = _strategy(min_train_nodes=3)
    server.records = [{"round": 1, "clients": []}]  # past round 1: the federation no longer waits for every node
    sent = server.configure_train(2, shared_to_arrays(REFERENCE), ConfigRecord({}), _Grid([0, 1, 3]))
    assert [m.metadata.dst_node_id for m in sent] == [10, 11, 13]
    assert "clients [2] are asked to train but have no node connected" in caplog.text
    server.aggregate_train(2, [_Reply(10 + c, update_to_reply(_update(c, 1.0, 2), "c")) for c in (0, 1, 3)])
    assert [row["client_id"] for row in server._round["clients"]] == [0, 1, 3]


# ---- the simulation engine -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_flower_simulation_gives_the_accelerate_run_per_client_metrics(world, tmp_path):
    # three of the four clients asked each round: clients that sit rounds out, and rows of clients evaluated only
    extra = {
        "data.client_values": CLIENTS,
        "evaluation.before_aggregation": "true",
        "save_models": "true",
        "clients_per_round": 3,
    }
    accelerate = accelerate_run(tiny_overrides(*world, tmp_path / "accelerate", **extra))
    assert comigs(["flower-sim", *tiny_overrides(*world, tmp_path / "flower", **extra)]) == 0
    flower = json.loads((tmp_path / "flower" / "results.json").read_text())
    assert flower["transport"] == "flower" and accelerate["transport"] == "accelerate"
    figures = [key for key in TEST_FIGURES if not key.startswith("ood_") and key in accelerate["clients"][0]]
    assert "test_ppl_before_aggregation" in figures and "paper_test_ppl" in figures
    for ours, theirs in zip(flower["clients"], accelerate["clients"]):
        assert ours["name"] == theirs["name"]
        # a client that sat the last round out has no figures from right after local steps, on either transport
        present = [key for key in figures if key in theirs]
        assert present == [key for key in figures if key in ours]
        for key in present + ["bytes_sent", "bytes_received", "tokens_seen", "train_tokens", "rounds_trained"]:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5), (ours["name"], key)
    assert sorted(c["rounds_trained"] for c in flower["clients"]) != [3, 3, 3, 3]
    for name in ("curves.csv", "global_generalist/adapter_model.safetensors"):
        assert (tmp_path / "flower" / name).is_file()
    saved = sorted(path.name for path in (tmp_path / "flower" / "clients").iterdir())
    assert saved == sorted(path.name for path in (tmp_path / "accelerate" / "clients").iterdir())
    with pytest.raises(SystemExit):  # the node states of that run are not overwritten by another
        comigs(["flower-sim", *tiny_overrides(*world, tmp_path / "flower", **extra)])


# ---- the deployment engine -----------------------------------------------------------------------------------------
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr and the apps' processes
FLOWER_APP = Path(__file__).resolve().parents[1] / "recipes" / "flower"


def _certificates(root: Path, nodes: int) -> dict[str, Path]:
    """A CA, the SuperLink's certificate for 127.0.0.1 signed by it, and one EC key pair per SuperNode (OpenSSH
    format, as Flower's SuperNode authentication reads them), all made offline."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    root.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    pem = serialization.Encoding.PEM

    def certificate(subject: str, key, issuer_name, issuer_key, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = certificate("test CA", ca_key, ca_name, ca_key, ca=True)
    paths = {"ca": root / "ca.crt", "certificate": root / "server.pem", "key": root / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["certificate"].write_bytes(certificate("127.0.0.1", server_key, ca_name, ca_key, ca=False).public_bytes(pem))
    paths["key"].write_bytes(
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    for node in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        paths[f"node-{node}"] = root / f"node-{node}"
        paths[f"node-{node}"].write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        )
        paths[f"node-{node}.pub"] = root / f"node-{node}.pub"
        paths[f"node-{node}.pub"].write_bytes(
            key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        )
    return paths


class _Deployment:
    """A SuperLink and SuperNodes on 127.0.0.1 (insecure), each its own process, and `flwr run` submitting to them
    through a connection in a Flower home of its own."""

    def __init__(self, root: Path, tls: dict[str, Path] | None = None):
        self.root, self.port = root, free_port()  # the SuperLink serves its Fleet, Control and Runtime APIs there
        self.tls = tls
        home = root / "flwr-home"
        home.mkdir(parents=True)
        security = f'root-certificates = "{tls["ca"]}"' if tls else "insecure = true"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{self.port}"\n{security}\n'
        )
        path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
        self.env = {**os.environ, "FLWR_HOME": str(home), "PATH": path, "CUDA_VISIBLE_DEVICES": ""}
        self.processes: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, command: list[str]) -> None:
        log = open(self.root / f"{name}.log", "ab")
        # a session of its own: killing it takes its ClientApp processes along, as a machine's failure would
        self.processes[name] = subprocess.Popen(
            command, env=self.env, cwd=self.root, stdout=log, stderr=log, start_new_session=True
        )

    def start_superlink(self) -> None:
        self._start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                *self._superlink_security(),
                "--disable-runtime-dependency-installation",  # the ServerApp runs in this environment
                "--host=127.0.0.1",
                f"--port={self.port}",
                f"--database={self.root / 'state.db'}",
                f"--health-server-address=127.0.0.1:{free_port()}",
            ],
        )

    def start_supernode(self, client: int, state_dir: Path) -> None:
        self._start(
            f"supernode-{client}",
            [
                str(BIN / "flower-supernode"),
                *self._supernode_security(client),
                f"--superlink=127.0.0.1:{self.port}",
                f"--port={free_port()}",
                "--node-config",
                f'partition-id={client} state-dir="{state_dir}"',
            ],
        )

    def _superlink_security(self) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        tls = self.tls
        files = ["--ssl-ca-certfile", tls["ca"], "--ssl-certfile", tls["certificate"], "--ssl-keyfile", tls["key"]]
        return [*map(str, files), "--enable-supernode-auth"]

    def _supernode_security(self, client: int) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        return [
            "--root-certificates",
            str(self.tls["ca"]),
            "--auth-supernode-private-key",
            str(self.tls[f"node-{client}"]),
        ]

    def register(self, client: int) -> None:
        """Admit client `client`'s SuperNode by its public key (SuperNode authentication), through the Control API."""
        command = [str(BIN / "flwr"), "supernode", "register", str(self.tls[f"node-{client}.pub"]), "test"]
        for _ in range(60):  # the SuperLink may still be starting
            done = subprocess.run(command, env=self.env, cwd=self.root, capture_output=True, text=True)
            if done.returncode == 0:
                return
            time.sleep(0.5)
        raise AssertionError(f"flwr supernode register failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    def kill(self, name: str) -> None:
        process = self.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def submit(self, recipe: Path) -> subprocess.Popen:
        command = [str(BIN / "flwr"), "run", str(FLOWER_APP), "test", "--stream", "--run-config", f'config="{recipe}"']
        return subprocess.Popen(command, env=self.env, cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        for name in list(self.processes):
            self.kill(name)


@pytest.fixture
def deployment(tmp_path):
    running = _Deployment(tmp_path / "deployment")
    yield running
    running.stop()


@pytest.fixture
def tls_deployment(tmp_path):
    running = _Deployment(tmp_path / "deployment", tls=_certificates(tmp_path / "certificates", nodes=4))
    yield running
    running.stop()


def _recipe_file(world, tmp_path: Path, output_dir: Path, **extra) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config_to_dict(_recipe(world, output_dir, **extra))))
    return path


def _finished(run: subprocess.Popen, deployment: _Deployment, timeout: float = 600) -> str:
    output, _ = run.communicate(timeout=timeout)
    text = output.decode(errors="replace")
    assert run.returncode == 0, text[-3000:] + deployment.logs()
    return text


@pytest.mark.slow
def test_a_superlink_and_four_authenticated_supernodes_over_tls_give_the_accelerate_run_metrics(
    world, tmp_path, tls_deployment
):
    deployment = tls_deployment
    # each ClientApp message is a fresh process on a SuperNode (imports, base, data: ~10 s here), so 2 rounds with one
    # evaluation: the second round trains from the state each node persisted in the first
    extra = {"data.client_values": CLIENTS, "save_models": "true", "rounds": 2, "eval_every": 2}
    accelerate = accelerate_run(tiny_overrides(*world, tmp_path / "accelerate", **extra))
    recipe = _recipe_file(world, tmp_path, tmp_path / "flower", **extra)
    deployment.start_superlink()
    for client in range(4):  # each organisation's node, admitted by its public key, keeps its state where it chooses
        deployment.register(client)
        deployment.start_supernode(client, tmp_path / f"organisation-{client}")
    text = _finished(deployment.submit(recipe), deployment)
    assert (tmp_path / "flower" / "results.json").is_file(), text[-3000:] + deployment.logs()
    flower = json.loads((tmp_path / "flower" / "results.json").read_text())
    assert flower["transport"] == "flower" and flower["num_nodes"] == 4
    for ours, theirs in zip(flower["clients"], accelerate["clients"]):
        for key in ("test_loss", "paper_test_ppl", "bytes_sent", "bytes_received", "tokens_seen", "train_tokens"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5), (ours["name"], key)
    assert all((tmp_path / f"organisation-{client}" / f"client-{client}").is_dir() for client in range(4))


@pytest.mark.slow
def test_a_supernode_killed_mid_round_rejoins_from_its_saved_state_while_the_others_go_on(world, tmp_path, deployment):
    # two organisations (each message costs a fresh process on a SuperNode); the second's machine dies while its
    # ClientApp computes round 2, after it saved its round-1 state: the federation goes on without it in round 2 (once
    # Flower declares the node offline, two missed heartbeats later) and it rejoins in round 3 from that state. Killed
    # mid-computation, never mid-reply: a reply cut off while it uploads holds the round for minutes.
    extra = {"data.client_values": "[cooking,finance]", "save_models": "false", "rounds": 3, "eval_every": 3}
    recipe = _recipe_file(world, tmp_path, tmp_path / "flower", **extra, min_train_nodes=1)
    deployment.start_superlink()
    for client in range(2):
        deployment.start_supernode(client, tmp_path / f"organisation-{client}")
    run = deployment.submit(recipe)
    state, log = tmp_path / "organisation-1" / "client-1" / "round-1.pt", deployment.root / "supernode-1.log"
    deadline = time.monotonic() + 300
    # its second train message received: a ClientApp process is starting (imports alone take seconds)
    while not (state.is_file() and log.read_text(errors="replace").count("Receiving: train message") >= 2):
        assert run.poll() is None and time.monotonic() < deadline, deployment.logs()
        time.sleep(0.05)
    deployment.kill("supernode-1")  # the machine dies, its ClientApp processes with it
    deployment.start_supernode(1, tmp_path / "organisation-1")  # and is started again on the same state folder
    _finished(run, deployment)
    with open(tmp_path / "flower" / "curves.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row["trained"] == "True"]
    trained = {t: {row["client"] for row in rows if int(row["round"]) == t} for t in (1, 2, 3)}
    assert trained == {1: {"cooking", "finance"}, 2: {"cooking"}, 3: {"cooking", "finance"}}
    saved = torch.load(state.with_name("round-3.pt"), weights_only=True)
    assert saved["round"] == 3
    # its round 1 before the kill and its round 3 after: it resumed from its state (a fresh start would lack round 1)
    assert saved["state"]["expert_steps"] == 2 * 2
    results = json.loads((tmp_path / "flower" / "results.json").read_text())
    assert all(client["test_ppl"] is not None for client in results["clients"])
