"""The real `VastClient` against the fake vast.ai API over HTTP: shapes on the wire, the instance life
cycle, pagination, and how it behaves when vast.ai rate-limits, fails, stalls or refuses the key."""

from __future__ import annotations

import logging
import time

import pytest

from src.adapters.vast import VastAuthError, VastClient, VastError, VastUnavailable
from tests.fakes.fake_vast_api import FakeVastApi

IMAGE = "vastai/base-image:cuda-12.4"


def _rent(client: VastClient, offer_id: int = 1001, label: str = "gpusnap-m1") -> int:
    return client.create_instance(offer_id, image=IMAGE, disk_gb=40, label=label)


def _poll_until_running(client: VastClient, instance_id: int, polls: int = 10):
    for _ in range(polls):
        inst = client.show_instance(instance_id)
        if inst is not None and inst.is_running:
            return inst
    raise AssertionError(f"instance {instance_id} not running after {polls} polls")


# -- search ---------------------------------------------------------------------------------------


def test_search_sends_vast_filter_and_returns_cheapest_first(fake_vast: FakeVastApi, vast_client: VastClient) -> None:
    offers = vast_client.search_offers(gpu_name="RTX_4090", max_price_per_hour=1.0, min_disk_gb=80)
    # 1003 (unreliable) and 1006 (unverified) are cheaper but filtered out, as vast.ai would.
    assert [o.id for o in offers] == [1002, 1001]
    assert offers[0].dph_total == 0.35 and offers[0].country_code == "SE"
    [call] = fake_vast.calls_to("POST", "/api/v0/bundles/")
    assert call.json["gpu_name"] == {"eq": "RTX 4090"}
    assert call.json["order"] == [["dph_total", "asc"]]
    assert call.json["type"] == "on-demand"  # what vast-cli offers.py sends


def test_search_filters_region_disk_bandwidth_and_count(vast_client: VastClient) -> None:
    assert [o.id for o in vast_client.search_offers(region="eu")] == [1002]
    assert [o.id for o in vast_client.search_offers(region="us")] == [1004, 1001]
    assert [o.id for o in vast_client.search_offers(gpu_name="RTX 4090", min_inet_down_mbps=600)] == [1001]
    assert [o.id for o in vast_client.search_offers(num_gpus=2)] == [1005]
    assert [o.id for o in vast_client.search_offers(min_disk_gb=300)] == []
    assert [o.id for o in vast_client.search_offers(gpu_name="RTX 4090", verified=False, min_reliability=None)] == [
        1006,
        1003,
        1002,
        1001,
    ]
    assert len(vast_client.search_offers(limit=2)) == 2


# -- life cycle -----------------------------------------------------------------------------------


def test_create_show_progresses_to_running_with_ssh_endpoint(fake_vast: FakeVastApi, vast_client: VastClient) -> None:
    fake_vast.set_ssh_endpoint("127.0.0.1", 2222)
    iid = vast_client.create_instance(
        1001,
        image=IMAGE,
        disk_gb=40,
        label="gpusnap-m1",
        onstart="touch /root/ready",
        env={"GPUSNAP": "1", "-p 8000:8000": "1"},
    )
    body = fake_vast.create_body(iid)
    assert body == {
        "client_id": "me",
        "image": IMAGE,
        "disk": 40,
        "label": "gpusnap-m1",
        "runtype": "ssh",
        "env": {"GPUSNAP": "1", "-p 8000:8000": "1"},
        "onstart": "touch /root/ready",
    }
    first = vast_client.show_instance(iid)
    # vast.ai shows the proxy endpoint while the container is still loading: it is not usable yet.
    assert first.actual_status == "loading" and not first.is_running and first.ssh_endpoint is not None
    inst = _poll_until_running(vast_client, iid)
    # runtype "ssh" is the proxy: no 22/tcp mapping, so the proxy endpoint is the one.
    assert (inst.ssh_endpoint.host, inst.ssh_endpoint.port, inst.ssh_endpoint.kind) == ("127.0.0.1", 2222, "proxy")
    assert (inst.ssh_host, inst.ssh_port, inst.ports, inst.image_runtype) == ("127.0.0.1", 2222, {}, "ssh")
    assert (inst.label, inst.gpu_name, inst.num_gpus, inst.disk_space) == ("gpusnap-m1", "RTX 4090", 1, 40.0)
    assert fake_vast.running_instances()[0]["id"] == iid


def test_fixture_points_instances_at_the_loopback_sshd(sshd, fake_vast: FakeVastApi, vast_client: VastClient) -> None:
    inst = _poll_until_running(vast_client, _rent(vast_client))
    assert (inst.ssh_endpoint.host, inst.ssh_endpoint.port) == (sshd.host, sshd.port)


def test_show_unknown_instance_is_none(vast_client: VastClient) -> None:
    assert vast_client.show_instance(999999) is None


def test_instances_that_never_come_up(fake_vast: FakeVastApi, vast_client: VastClient) -> None:
    fake_vast.stay_loading(offer_id=1001)
    fake_vast.fail_start("exited", next_n=1)
    stuck, exited = _rent(vast_client, 1001), _rent(vast_client, 1002)
    for _ in range(5):
        assert vast_client.show_instance(stuck).actual_status == "loading"
        assert vast_client.show_instance(exited).actual_status == "exited"
    assert fake_vast.running_instances() == [] and len(fake_vast.live_instances()) == 2


def test_create_from_unknown_offer_is_a_vast_error(vast_client: VastClient) -> None:
    with pytest.raises(VastError) as info:
        _rent(vast_client, offer_id=1007)  # not rentable any more
    assert (info.value.code, info.value.status, info.value.vast_error) == ("vast_error", 404, "no_such_ask")
    assert not info.value.retryable


def test_list_follows_pages_and_filters_by_label_prefix(fake_vast: FakeVastApi, vast_client: VastClient) -> None:
    fake_vast.page_size = 2
    ours = [_rent(vast_client, label=f"gpusnap-m{n}") for n in range(5)]
    other = _rent(vast_client, label="someone-else")
    assert [i.id for i in vast_client.list_instances()] == ours + [other]
    assert [i.id for i in vast_client.list_instances(label_prefix="gpusnap-")] == ours
    pages = [c for c in fake_vast.calls_to("GET", "/api/v1/instances/") if c.status != 429]
    assert len(pages) == 6  # 3 pages per listing of 6 instances
    assert "after_token" not in pages[0].query and pages[1].query["after_token"]
    assert fake_vast.calls_to("GET", "/api/v0/instances/") == []  # the v0 list is gone (410)


def test_stop_and_start(fake_vast: FakeVastApi, vast_client: VastClient) -> None:
    iid = _rent(vast_client)
    _poll_until_running(vast_client, iid)
    vast_client.stop_instance(iid)
    inst = vast_client.show_instance(iid)
    assert (inst.actual_status, inst.intended_status) == ("stopped", "stopped")
    vast_client.stop_instance(iid)  # idempotent
    vast_client.start_instance(iid)
    assert vast_client.show_instance(iid).is_running
    assert [c.json for c in fake_vast.calls_to("PUT", "/api/v0/instances/") if c.status != 429] == [
        {"state": "stopped"},
        {"state": "stopped"},
        {"state": "running"},
    ]


def test_destroy_is_idempotent(fake_vast: FakeVastApi, vast_client: VastClient) -> None:
    iid = _rent(vast_client)
    vast_client.destroy_instance(iid)
    vast_client.destroy_instance(iid)
    vast_client.destroy_instance(424242)
    assert vast_client.show_instance(iid) is None
    assert fake_vast.live_instances() == []


def test_destroyed_instance_may_linger_for_a_few_reads(fake_vast: FakeVastApi, vast_client: VastClient) -> None:
    iid = _rent(vast_client)
    fake_vast.linger_after_destroy(gets=3)
    vast_client.destroy_instance(iid)
    assert fake_vast.live_instances() == []  # billing stopped at once...
    assert [i.id for i in vast_client.list_instances()] == [iid]  # ...but vast.ai still shows it a while
    assert vast_client.show_instance(iid) is not None
    assert vast_client.show_instance(iid) is not None
    assert vast_client.show_instance(iid) is None
    assert vast_client.list_instances() == []


def test_destroy_retries_5xx_then_succeeds(fake_vast: FakeVastApi, vast_client: VastClient) -> None:
    iid = _rent(vast_client)
    fake_vast.fail_next_destroys(2)
    vast_client.destroy_instance(iid)
    assert [c.status for c in fake_vast.calls_to("DELETE")] == [500, 500, 200]
    assert fake_vast.live_instances() == []


# -- failures -------------------------------------------------------------------------------------


@pytest.mark.parametrize("retry_after", ["0", None])
def test_429_is_retried_and_succeeds(fake_vast: FakeVastApi, vast_client: VastClient, retry_after) -> None:
    fake_vast.rate_limit_next(2, retry_after=retry_after)
    assert vast_client.search_offers(region="eu")[0].id == 1002
    assert [c.status for c in fake_vast.calls_to("POST")] == [429, 429, 200]


def test_create_is_retried_after_429_because_vast_did_not_act(fake_vast: FakeVastApi, vast_client: VastClient) -> None:
    fake_vast.rate_limit_next(1)
    _rent(vast_client)
    assert len(fake_vast.live_instances()) == 1


def test_5xx_retried_until_vast_unavailable(fake_vast: FakeVastApi, vast_client: VastClient) -> None:
    fake_vast.fail_next(10, status=502, path_prefix="/api/v0/bundles/")
    with pytest.raises(VastUnavailable) as info:
        vast_client.search_offers()
    assert (info.value.code, info.value.retryable, info.value.status) == ("vast_unavailable", True, 502)
    assert len(fake_vast.calls_to("POST")) == vast_client.max_retries + 1


def test_bad_key_is_vast_auth_error_and_not_retried(fake_vast: FakeVastApi, caplog) -> None:
    client = VastClient("wrong-key-s3cr3t", fake_vast.base_url, max_retries=3, backoff_base=0.001)
    with caplog.at_level(logging.DEBUG), pytest.raises(VastAuthError) as info:
        client.list_instances()
    assert (info.value.code, info.value.retryable, info.value.status) == ("vast_auth_failed", False, 401)
    assert [c.status for c in fake_vast.calls] == [401]
    assert "s3cr3t" not in caplog.text and "s3cr3t" not in str(info.value) and "s3cr3t" not in repr(client)


def test_timeout_is_retried(fake_vast: FakeVastApi, caplog) -> None:
    client = VastClient(fake_vast.api_key, fake_vast.base_url, timeout=(1, 0.3), max_retries=2, backoff_base=0.001)
    fake_vast.slow_next(1, seconds=0.8, path_prefix="/api/v1/instances/")
    with caplog.at_level(logging.WARNING, logger="src.adapters.vast"):
        assert client.list_instances() == []
    assert "ReadTimeout" in caplog.text and "retry 1 of 2" in caplog.text


def test_create_timing_out_after_acting_is_not_retried(fake_vast: FakeVastApi) -> None:
    client = VastClient(fake_vast.api_key, fake_vast.base_url, timeout=(1, 0.3), max_retries=3, backoff_base=0.001)
    fake_vast.slow_next(1, seconds=0.6, path_prefix="/api/v0/asks/")
    with pytest.raises(VastUnavailable):
        _rent(client, label="gpusnap-m9")
    # The one slow create did rent (vast.ai acted); a retry would have rented a second machine.
    orphans = []
    for _ in range(20):  # the fake finishes the slow request after the client gave up on it
        orphans = client.list_instances(label_prefix="gpusnap-m9")
        if orphans:
            break
        time.sleep(0.05)
    assert len(orphans) == 1 and len(fake_vast.live_instances()) == 1


def test_create_500_leaves_contract_that_list_finds(fake_vast: FakeVastApi, vast_client: VastClient) -> None:
    fake_vast.fail_next_creates(1, mode="http_500")
    with pytest.raises(VastUnavailable) as info:
        _rent(vast_client, label="gpusnap-m3")
    assert info.value.instance_id is None
    assert len(fake_vast.calls_to("PUT", "/api/v0/asks/")) == 1  # not retried: it may have rented
    [orphan] = vast_client.list_instances(label_prefix="gpusnap-m3")
    vast_client.destroy_instance(orphan.id)
    assert fake_vast.live_instances() == []


def test_create_success_false_names_the_contract_it_left(fake_vast: FakeVastApi, vast_client: VastClient) -> None:
    fake_vast.fail_next_creates(1, mode="success_false")
    with pytest.raises(VastError) as info:
        _rent(vast_client, label="gpusnap-m4")
    assert info.value.vast_error == "resources_unavailable" and info.value.instance_id is not None
    assert [i.id for i in vast_client.list_instances(label_prefix="gpusnap-m4")] == [info.value.instance_id]
    vast_client.destroy_instance(info.value.instance_id)
    assert fake_vast.live_instances() == []


def test_unreachable_vast_is_vast_unavailable() -> None:
    client = VastClient("k", "http://127.0.0.1:9", timeout=(0.2, 0.2), max_retries=1, backoff_base=0.001)
    with pytest.raises(VastUnavailable):
        client.show_instance(1)
    with pytest.raises(VastUnavailable):  # never connected, so even a create was retried, then gave up
        _rent(client)


# -- vast.ai as it really answers (issue 8) -------------------------------------------------------


def test_a_new_instance_is_null_then_loading_then_running(fake_vast: FakeVastApi, vast_client: VastClient) -> None:
    iid = _rent(vast_client)
    assert fake_vast.instance(iid)["actual_status"] is None  # provisioning: vast.ai says null
    assert vast_client.show_instance(iid).actual_status == "loading"
    assert _poll_until_running(vast_client, iid).is_running


@pytest.mark.parametrize(
    "runtype, kind",
    [
        ("ssh_direct", "direct"),
        ("jupyter_direct", "direct"),
        ("ssh", "proxy"),
        ("ssh_proxy", "proxy"),
        ("jupyter", "proxy"),
        ("jupyter_proxy", "proxy"),
    ],
)
def test_only_the_endpoint_the_runtype_makes_live_reaches_the_host(
    fake_vast: FakeVastApi, vast_client: VastClient, runtype: str, kind: str
) -> None:
    fake_vast.set_ssh_endpoint("127.0.0.1", 2222)
    iid = vast_client.create_instance(1001, image=IMAGE, disk_gb=40, label="m", runtype=runtype)
    inst = _poll_until_running(vast_client, iid)
    assert inst.image_runtype == runtype
    assert (inst.ssh_endpoint.host, inst.ssh_endpoint.port, inst.ssh_endpoint.kind) == ("127.0.0.1", 2222, kind)
    other = inst.proxy_ssh_endpoint if kind == "direct" else inst.direct_ssh_endpoint
    assert other is None or other.port == fake_vast.dead_port


def test_jupyter_proxy_ssh_is_the_port_after_ssh_port(fake_vast: FakeVastApi, vast_client: VastClient) -> None:
    fake_vast.set_ssh_endpoint("127.0.0.1", 2222)
    inst = _poll_until_running(
        vast_client, vast_client.create_instance(1001, image=IMAGE, disk_gb=40, label="m", runtype="jupyter_proxy")
    )
    assert inst.ssh_port == 2221 and inst.ssh_endpoint.port == 2222  # vast-cli misc.py: ssh_port + 1


def test_direct_runtype_on_a_host_without_direct_ports_falls_back_to_the_proxy(
    fake_vast: FakeVastApi, vast_client: VastClient
) -> None:
    fake_vast.set_ssh_endpoint("127.0.0.1", 2222)
    inst = _poll_until_running(
        vast_client, vast_client.create_instance(1004, image=IMAGE, disk_gb=40, label="m", runtype="ssh_direct")
    )
    assert inst.direct_ssh_endpoint is None
    assert (inst.ssh_endpoint.port, inst.ssh_endpoint.kind) == (2222, "proxy")


def test_search_can_ask_for_hosts_with_direct_ports(fake_vast: FakeVastApi, vast_client: VastClient) -> None:
    assert 1004 in [o.id for o in vast_client.search_offers(region="us")]
    assert [o.id for o in vast_client.search_offers(region="us", min_direct_ports=1)] == [1001]
    call = [c for c in fake_vast.calls_to("POST", "/api/v0/bundles/") if c.status == 200][-1]
    assert call.json["direct_port_count"] == {"gte": 1}


@pytest.mark.parametrize(
    "query, msg",
    [
        ({"gpu_nam": {"eq": "RTX 4090"}}, "unknown field gpu_nam"),
        ({"num_gpus": {"ge": 1}}, "unknown operator ge"),
        ({"num_gpus": 1}, "must be dict of conditions"),
    ],
)
def test_fake_refuses_unknown_search_fields_and_operators(
    fake_vast: FakeVastApi, vast_client: VastClient, query: dict, msg: str
) -> None:
    """What the client sends is checked against vast.ai's schema, so a typo in our filter fails here."""
    response = vast_client._call("POST", "/api/v0/bundles/", json={**query, "type": "on-demand"})
    assert response.status_code == 400 and msg in response.json()["msg"]
    vast_client.search_offers(
        gpu_name="RTX 4090", region="eu", max_price_per_hour=1, min_disk_gb=10, min_inet_down_mbps=1, min_direct_ports=1
    )  # everything we send is known
    assert fake_vast.calls[-1].status == 200


def test_offer_gone_is_410_no_such_ask(fake_vast: FakeVastApi, vast_client: VastClient) -> None:
    fake_vast.offer_gone(1001)
    with pytest.raises(VastError) as info:
        _rent(vast_client)
    assert (info.value.status, info.value.vast_error, info.value.retryable) == (410, "no_such_ask", False)
    assert fake_vast.live_instances() == []


def test_over_long_label_is_refused_before_any_call(fake_vast: FakeVastApi, vast_client: VastClient) -> None:
    with pytest.raises(VastError) as info:
        _rent(vast_client, label="gpusnap:" + "m" * 120 + ":job:0")
    assert info.value.code == "label_too_long"
    assert fake_vast.calls_to("PUT", "/api/v0/asks/") == [] and fake_vast.live_instances() == []
    _rent(vast_client, label="x" * 64)  # the longest we allow is accepted


def test_fake_refuses_over_long_labels_like_vast(fake_vast: FakeVastApi, vast_client: VastClient) -> None:
    response = vast_client._call(
        "PUT", "/api/v0/asks/1001/", json={"image": IMAGE, "label": "x" * 65}, idempotent=False
    )
    assert response.status_code == 400 and response.json() == {
        "success": False,
        "error": "invalid_args",
        "msg": "label_too_long",
    }
    assert fake_vast.live_instances() == []


def test_start_while_gpus_taken_is_queued_and_happens_later_unless_cancelled(
    fake_vast: FakeVastApi, vast_client: VastClient
) -> None:
    queued, cancelled = _rent(vast_client, label="a"), _rent(vast_client, label="b")
    for iid in (queued, cancelled):
        _poll_until_running(vast_client, iid)
        vast_client.stop_instance(iid)
        fake_vast.take_gpus(iid, free_after_s=0.3)
        with pytest.raises(VastError) as info:
            vast_client.start_instance(iid)
        assert info.value.vast_error == "resources_unavailable" and info.value.retryable
        inst = vast_client.show_instance(iid)
        assert (inst.actual_status, inst.intended_status) == ("stopped", "running")  # the start is queued
    vast_client.stop_instance(cancelled)
    time.sleep(0.35)
    assert fake_vast.instance(queued)["actual_status"] in ("loading", "running")  # started (and bills) by itself
    assert (fake_vast.instance(cancelled)["actual_status"], fake_vast.instance(cancelled)["intended_status"]) == (
        "stopped",
        "stopped",
    )


def test_polling_faster_than_vast_allows_gets_429_and_the_client_backs_off(fake_vast: FakeVastApi) -> None:
    """vast.ai enforces a minimum interval per endpoint and answers 429 without Retry-After; the client's
    backoff must outlast it and still succeed."""
    fake_vast.rate_limit_scale = 0.05  # show: 100 ms between accepted calls
    client = VastClient(fake_vast.api_key, fake_vast.base_url, max_retries=6, backoff_base=0.02)
    iid = _rent(client)
    started = time.monotonic()
    for _ in range(4):
        assert client.show_instance(iid) is not None
    assert time.monotonic() - started >= 0.3  # 4 accepted reads need 3 full intervals
    statuses = [c.status for c in fake_vast.calls_to("GET", f"/api/v0/instances/{iid}/")]
    assert 429 in statuses and statuses.count(200) == 4
    assert all(c.status == 429 for c in fake_vast.calls if c.status != 200)
