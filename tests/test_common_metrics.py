from prometheus_client.parser import text_string_to_metric_families

from fastserve.common.metrics import Metrics
from fastserve.common.schemas import SchedulerStats


def _samples(metrics):
    body, ctype = metrics.render()
    assert ctype.startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_names_and_values():
    m = Metrics("tiny")
    m.observe_first_token(0.05)
    m.observe_inter_token(0.01)
    m.observe_queue_time(0.002)
    m.observe_request(0.5, "length", prompt_tokens=7, generated_tokens=4)
    m.observe_error(400)
    m.observe_scheduler_stats(SchedulerStats("s1", 1.0, queue_lengths=[2, 0, 1], num_running=2, num_waiting=3,
                                             num_swapped=1, gpu_kv_usage=0.75, cpu_kv_usage=0.25, num_preemptions=5))
    s = _samples(m)
    mn = (("model_name", "tiny"),)
    sc = (("model_name", "tiny"), ("scheduler", "s1"))
    assert s[("fastserve:time_to_first_token_seconds_count", mn)] == 1
    assert s[("fastserve:inter_token_latency_seconds_count", mn)] == 1
    assert s[("fastserve:request_queue_time_seconds_count", mn)] == 1
    assert s[("fastserve:e2e_request_latency_seconds_sum", mn)] == 0.5
    assert s[("fastserve:prompt_tokens_total", mn)] == 7
    assert s[("fastserve:generation_tokens_total", mn)] == 4
    assert s[("fastserve:request_success_total", (("finished_reason", "length"), ("model_name", "tiny")))] == 1
    assert s[("fastserve:num_requests_running", sc)] == 2
    assert s[("fastserve:num_requests_waiting", sc)] == 3
    assert s[("fastserve:num_requests_swapped", sc)] == 1
    assert s[("fastserve:kv_cache_usage_perc", sc)] == 0.75
    assert s[("fastserve:cpu_cache_usage_perc", sc)] == 0.25
    assert s[("fastserve:num_preemptions_total", sc)] == 5
    assert s[("fastserve:mlfq_queue_jobs", (*sc[:1], ("queue", "2"), sc[1]))] == 1


def test_preemption_counter_follows_cumulative_stats_and_restarts():
    m = Metrics("tiny")
    for n in (3, 8, 2):  # 2: the scheduler restarted
        m.observe_scheduler_stats(SchedulerStats("s1", 0.0, num_preemptions=n))
    assert _samples(m)[("fastserve:num_preemptions_total", (("model_name", "tiny"), ("scheduler", "s1")))] == 10


def test_forget_scheduler_and_shrinking_queues():
    m = Metrics("tiny")
    m.observe_scheduler_stats(SchedulerStats("s1", 0.0, queue_lengths=[1, 1, 1], num_running=1))
    m.observe_scheduler_stats(SchedulerStats("s1", 0.0, queue_lengths=[4]))
    queues = [k for k in _samples(m) if k[0] == "fastserve:mlfq_queue_jobs"]
    assert len(queues) == 1
    m.forget_scheduler("s1")
    assert not [k for k in _samples(m) if k[0] in ("fastserve:mlfq_queue_jobs", "fastserve:num_requests_running")]


def test_separate_registries_do_not_clash():
    a, b = Metrics("a"), Metrics("b")
    a.observe_first_token(1.0)
    assert ("fastserve:time_to_first_token_seconds_count", (("model_name", "a"),)) in _samples(a)
    assert ("fastserve:time_to_first_token_seconds_count", (("model_name", "a"),)) not in _samples(b)
