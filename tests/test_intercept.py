"""How TCP to VIPs reaches the proxy (``--tcp-intercept``), end to end in a lab.

The rest of the end-to-end suite runs with the default, BPF sk_lookup (conftest's
``agent`` asserts it; test_mesh.py checks what that mode leaves in the nat table
and that an endpoint inside the VIP range does not loop back into the proxy).
Here, each with an agent of its own: iptables REDIRECT with each relay, and
``auto`` falling back to REDIRECT where the kernel refuses BPF.
"""

from __future__ import annotations

import pytest
from conftest import Peers

from consulate.control.lab import Lab
from consulate.control.labagent import AgentStartError, LabAgent

pytestmark = pytest.mark.lab

REDIRECT_RULE = "-A CONSULATE-PREROUTING -d 240.0.0.0/4 -p tcp -j REDIRECT --to-ports 10000"
UDP_RULE = "-A CONSULATE-PREROUTING -d 240.0.0.0/4 -p udp -j CONSULATE-UDP"


def _nat_rules(lab: Lab) -> str:
    return lab.exec("h1", ["iptables-save", "-t", "nat"], capture_output=True, text=True,
                    check=True).stdout


def _start(lab: Lab, work: pytest.TempPathFactory, name: str, *args: str,
           launcher: tuple[str, ...] = ()) -> LabAgent:
    path = work.mktemp(name)
    return LabAgent(lab, 1, path / "data", path / "agent.log", launcher=list(launcher),
                    extra_args=["--connect-timeout", "1", *args]).start()


@pytest.mark.parametrize("relay", ["native", "python"])
def test_redirect_mode_relays_through_the_nat_rules(
        mesh_lab: Lab, tmp_path_factory: pytest.TempPathFactory, relay: str) -> None:
    redirected = _start(mesh_lab, tmp_path_factory, f"redirect-{relay}", "--relay", relay,
                        "--tcp-intercept", "redirect")
    try:
        _check_redirected(mesh_lab, redirected)
    finally:
        redirected.stop()  # before the module's sk-lookup agents use h1


def _check_redirected(mesh_lab: Lab, redirected: LabAgent) -> None:
    stats = redirected.api("GET", "/v1/agent/self")["Stats"]
    assert stats["iptables"]["tcp_intercept"] == "redirect"
    rules = _nat_rules(mesh_lab)
    assert REDIRECT_RULE in rules and UDP_RULE in rules
    peers = Peers(mesh_lab)
    try:
        peers.serve("h1c1", "red-1", 7070)
        redirected.register("red", "red-1", mesh_lab.container_ip(1, 1), 7070)
        [result] = peers.connect("h1c4", "red.service.consul", 7070, size=64 * 1024)
        assert result["ok"] and result["echo_ok"] and result["trailer_ok"], result
        assert result["id"] == "red-1"
    finally:
        peers.stop_all()
    # straight to the proxy's port: conntrack's original destination is no VIP
    [direct] = peers.connect("h1c4", mesh_lab.bridge_ip(1), 10000)
    assert not direct["ok"], direct
    assert f"destination={mesh_lab.bridge_ip(1)}:10000 reason=unknown-vip" in redirected.log()


def test_auto_falls_back_to_redirect_where_bpf_is_refused(
        mesh_lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Without CAP_BPF and CAP_SYS_ADMIN in its bounding set, the kernel refuses the agent's
    # socket map: auto says why and uses REDIRECT, sk-lookup refuses to start.
    without_bpf = ("setpriv", "--bounding-set", "-bpf,-sys_admin", "--")
    agent = _start(mesh_lab, tmp_path_factory, "auto", "--tcp-intercept", "auto",
                   launcher=without_bpf)
    try:
        assert agent.api("GET", "/v1/agent/self")["Stats"]["iptables"]["tcp_intercept"] == \
            "redirect"
        assert ("event=sk-lookup-unavailable action=use-redirect error='cannot steer VIP "
                "connections with BPF sk_lookup: could not create its socket map (Operation "
                "not permitted): the agent needs CAP_BPF and CAP_NET_ADMIN (run it as root), "
                "or use --tcp-intercept redirect'") in agent.log()
        assert REDIRECT_RULE in _nat_rules(mesh_lab)
    finally:
        agent.stop()
    with pytest.raises(AgentStartError) as refused:
        _start(mesh_lab, tmp_path_factory, "sk-lookup", "--tcp-intercept", "sk-lookup",
               launcher=without_bpf)
    assert "exited with 1" in str(refused.value)
    assert ("consulate: error: cannot steer VIP connections with BPF sk_lookup: could not "
            "create its socket map (Operation not permitted)") in str(refused.value)
