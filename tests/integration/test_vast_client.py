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
    assert call.json["type"] == "ondemand"


def test_search_filters_region_disk_bandwidth_and_count(vast_client: VastClient) -> None:
    assert [o.id for o in vast_client.search_offers(region="eu")] == [1002]
    assert [o.id for o in vast_client.search_offers(region="us")] == [1004, 1001]
    assert [o.id for o in vast_client.search_offers(gpu_name="RTX 4090", min_inet_down_mbps=600)] == [1001]
    assert [o.id for o in vast_client.search_offers(num_gpus=2)] == [1005]
    assert [o.id for o in vast_client.search_offers(min_disk_gb=300)] == []
    assert [o.id for o in vast_client.search_offers(gpu_name="RTX 4090", verified=False, min_reliability=None)] \
        == [1006, 1003, 1002, 1001]
    assert len(vast_client.search_offers(limit=2)) == 2


# -- life cycle -----------------------------------------------------------------------------------

def test_create_show_progresses_to_running_with_ssh_endpoint(fake_vast: FakeVastApi, vast_client: VastClient) -> None:
    fake_vast.set_ssh_endpoint("127.0.0.1", 2222)
    iid = vast_client.create_instance(1001, image=IMAGE, disk_gb=40, label="gpusnap-m1",
                                      onstart="touch /root/ready", env={"GPUSNAP": "1", "-p 8000:8000": "1"})
    body = fake_vast.create_body(iid)
    assert body == {"client_id": "me", "image": IMAGE, "disk": 40, "label": "gpusnap-m1", "runtype": "ssh",
                    "env": {"GPUSNAP": "1", "-p 8000:8000": "1"}, "onstart": "touch /root/ready"}
    first = vast_client.show_instance(iid)
    assert first.actual_status == "loading" and first.ssh_endpoint is None
    inst = _poll_until_running(vast_client, iid)
    assert (inst.ssh_endpoint.host, inst.ssh_endpoint.port, inst.ssh_endpoint.kind) == ("127.0.0.1", 2222, "direct")
    assert (inst.ssh_host, inst.ssh_port) == ("127.0.0.1", 2222)
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
    pages = fake_vast.calls_to("GET", "/api/v1/instances/")
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
    assert [c.json for c in fake_vast.calls_to("PUT", "/api/v0/instances/")] == [
        {"state": "stopped"}, {"state": "stopped"}, {"state": "running"}]


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
