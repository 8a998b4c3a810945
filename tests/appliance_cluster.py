"""The appliance as a cluster node and as a cluster's front: one image, configured at boot by
system credentials (SMBIOS type 11), never by a change to its disk.

Run by `make image-test` beside appliance_smoke.py. Two guests boot at once: node "a", and a
front whose node list names "a" and a node "b" that does not exist. The guests reach each other
through the host: each forwards its port 80 to a loopback port here, which a guest reaches at
10.0.2.2, qemu's address for the host. So every client, the front included, comes from 10.0.2.2.
"""

import json
import shutil
import socket

import pytest
from appliance_smoke import BOOT_TIMEOUT_S, Appliance

#: Two guests share this machine's CPUs while they boot, each under software emulation.
CLUSTER_BOOT_TIMEOUT_S = 3 * BOOT_TIMEOUT_S


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    node = Appliance(["sandrun.node=a", "sandrun.front=10.0.2.2", "sandrun.rate_jobs_per_hour=50"])
    front = Appliance([f"sandrun.nodes=a=10.0.2.2:{node.port} b=10.0.2.2:{free_port()}"])
    try:  # both boot at once; the front answers /health once the node does
        node.wait_until_up(timeout=CLUSTER_BOOT_TIMEOUT_S)
        front.wait_until_up("sandrun: role front", timeout=CLUSTER_BOOT_TIMEOUT_S)
        yield node, front
    finally:
        for box in (node, front):
            box.stop()
            print(box.console()[-3000:])  # shown with -s or on failure
            shutil.rmtree(box.workdir, ignore_errors=True)


def test_each_guest_took_its_role_from_its_credentials(cluster):
    node, front = cluster
    assert "sandrun: role node behind 10.0.2.2" in node.console()
    assert "sandrun: role front for nodes a=10.0.2.2:" in front.console()
    assert "sandrun: process" not in front.console()  # a front runs no Sandrun of its own
    info = json.loads(node.request("GET", "/")[2])
    assert info["node"] == "a" and info["limits"]["jobs_per_hour_per_ip"] == 50, info  # credentials reached Sandrun


def test_a_job_runs_on_the_node_and_is_read_and_deleted_through_the_front(cluster):
    node, front = cluster
    assert json.loads(front.request("GET", "/")[2])["node"] == "a"  # "b" is down: the hash skips it
    doc, logs = front.run("print(6 * 7)", "python3", timeout=120)
    assert doc["job_id"].startswith("job-a-") and (doc["status"], logs["stdout"]) == ("completed", "42\n"), (doc, logs)
    assert node.request("GET", f"/status/{doc['job_id']}")[0] == 200  # it lives on the node
    assert front.request("DELETE", f"/jobs/{doc['job_id']}")[0] == 204
    assert front.request("GET", f"/status/{doc['job_id']}")[0] == 404


def test_a_down_node_answers_503_and_an_unknown_one_404(cluster):
    _, front = cluster
    status, headers, body = front.request("GET", "/status/job-b-" + "0" * 32)
    assert status == 503 and headers["Retry-After"] == "5" and json.loads(body)["error"] == "unavailable", (status, body)
    status, _, body = front.request("GET", "/logs/job-zz-" + "0" * 32)
    assert status == 404 and json.loads(body)["error"] == "not found", (status, body)
