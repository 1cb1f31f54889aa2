"""Fixtures: tiny models built once per session, real `vllm_serve.py` subprocesses on loopback, and
in-process `vllm.LLM` references to compare against. The pieces themselves live in tests/support.py.

Every server started here logs to a file that is printed when a test fails, and is stopped by PID with
SIGTERM; the fixture fails the test session if any of its processes outlived it.
"""

import os

import pytest

import support

# In-process engines (one process per worker) start in ~9 s instead of ~25 s; tests of vLLM's production
# layout (EngineCore in its own process) ask for it per server.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def pytest_report_header(config):
    """Which of vLLM's CPU kernels this run exercises: they are chosen by instruction set."""
    paths = support.cpu_paths()
    return [f"CPU: {paths['isa']}", f"vLLM CPU kernels: {paths['library']}; int8 GEMM of the int8 test model: "
            f"{paths['int8_gemm']}; attention: {paths['attention']}"]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """{"seed0", "seed1", "tied0", "tied1"} → paths of tiny models built locally."""
    import tiny_model

    root = tmp_path_factory.mktemp("models")
    specs = {"seed0": (0, False), "seed1": (1, False), "tied0": (0, True), "tied1": (1, True)}
    return {name: str(tiny_model.build(root / name, seed=seed, tied=tied)) for name, (seed, tied) in specs.items()}


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """Factory: start_server(model, *args, env=None, name=..., kind="ours", tls=, uds=) → a healthy support.Server
    (`wait=False`: launched only, for servers that start side by side; call its wait_healthy()).
    Each is stopped at session end unless the test stopped it; none may leave a process behind."""
    log_dir = tmp_path_factory.mktemp("logs")
    started = []

    def start(model, *args, env=None, name="server", kind="ours", wait=True, **listen):
        server = support.Server(model, *support.SERVER_ARGS, *args, kind=kind, log_dir=log_dir, name=name, env=env,
                                **listen)
        started.append(server)
        return server.start() if wait else server.launch()

    def side_by_side(count, model, *args, name="server", **kwargs):
        """`count` servers launched at once, then waited for: → the healthy servers."""
        servers = [start(model, *args, name=f"{name}{i}", wait=False, **kwargs) for i in range(count)]
        return [server.wait_healthy() for server in servers]

    start.side_by_side = side_by_side
    yield start
    for server in started:
        server.stop()
    left = {server.name: server.left_behind for server in started if server.left_behind}
    assert not left, f"processes left behind by servers: {left}"


@pytest.fixture
def start_router(tmp_path_factory):
    """Factory: start_router(urls, *args, policy=...) → a ready support.Router, stopped when the test ends;
    none may leave a process behind."""
    log_dir = tmp_path_factory.mktemp("logs")
    started = []

    def start(urls, *args, **kwargs):
        router = support.Router(urls, *args, log_dir=log_dir, **kwargs)
        started.append(router)
        return router.start()

    yield start
    for router in started:
        router.stop()
    assert not [router.left_behind for router in started if router.left_behind], "processes left behind"


MP = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
STANDARD_FLAGS = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--trust-request-chat-template"]
SHARED = {  # the servers modules share: name → start_server's arguments
    # The standard tiny server: DP 1, hermes tool parser, auto tool choice, request chat templates allowed, and
    # vLLM's production layout (EngineCore in its own process: the replica overlaps rounds with engine steps).
    "server": dict(args=STANDARD_FLAGS, env=MP),
    # Stock `vllm serve` with the standard server's flags, as TRL documents it for weight sync: dev mode, and
    # our gloo weight-transfer engine, which vLLM's workers import through vLLM's own extension flag.
    "stock_server": dict(
        args=[*STANDARD_FLAGS, "--worker-extension-cls", "vllm_serve.WeightSyncWorkerExtension",
              "--weight-transfer-config", '{"backend": "gloo"}'], kind="stock", name="stock",
        env={**MP, "VLLM_SERVER_DEV_MODE": "1", "PYTHONPATH": str(support.ROOT)}),
    # A context that fits a request of 130k tokens (support.unending), in vLLM's production layout.
    # - A round without an output never ends by itself (an hour): new requests, aborts and pauses must reach
    #   the busy engine through the replicas' bell, or the tests that send them hang.
    # - A pause or a weight sync may hold requests for 10 minutes (--weight-sync-timeout) before they get a 503.
    "long_server": dict(args=[*support.LONG_SERVER_ARGS, "--round-wait-ms", "3600000", "--weight-sync-timeout",
                              "600"], name="long", env=MP),
}


@pytest.fixture(scope="session")
def shared(request, models, start_server):
    """The SHARED servers that this session's tests take, launched side by side when the first is needed: a
    start is 25-45 s here, mostly one core importing vLLM in one process after another, so two cores start
    two in about the time of one. → ({name: launched support.Server}, launch(name) for any other)."""
    def takes(item, name):
        info = getattr(item, "_fixtureinfo", None)
        if info is None:  # pytest's own field gone: by name (a module's fixture of that name counts too)
            return name in getattr(item, "fixturenames", ())
        defs = info.name2fixturedefs.get(name)
        return bool(defs) and defs[-1].func.__module__ == __name__  # the conftest's, not a module's own

    def launch(name):
        spec = dict(SHARED[name])
        return start_server(models["seed0"], *spec.pop("args"), wait=False, **spec)

    return {name: launch(name) for name in SHARED if any(takes(item, name) for item in request.session.items)}, launch


def shared_server(shared, name):
    """A SHARED server, healthy, stopped at the session's end with nothing left behind. Modules share it: a
    test that changes its weights serves the seed-0 ones again, and every test of `long_server` leaves nothing
    running."""
    launched, launch = shared
    srv = (launched.get(name) or launch(name)).wait_healthy()
    yield srv
    assert srv.stop() == 0 and not srv.left_behind, srv.left_behind


@pytest.fixture(scope="session")
def server(shared):
    yield from shared_server(shared, "server")


@pytest.fixture(scope="session")
def stock_server(shared):
    yield from shared_server(shared, "stock_server")


@pytest.fixture(scope="session")
def long_server(shared):
    yield from shared_server(shared, "long_server")


@pytest.fixture(scope="session")
def tokenizer(models):
    """The tiny models' tokenizer (every seed trains the same one)."""
    return support.tokenizer_of(models["seed0"])


@pytest.fixture(scope="session")
def reference_llm():
    """Factory: reference_llm(model_path) → an in-process vllm.LLM with the servers' settings (cached)."""
    from vllm import LLM

    cache = {}

    def get(model):
        if model not in cache:
            cache[model] = LLM(model=model, **support.LLM_KWARGS)
        return cache[model]

    return get


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failing test, print the tail of every server log it could see."""
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for name, value in item.funcargs.items():
            if isinstance(value, support.Server) and value.proc is not None:
                report.sections.append((f"{name} log ({value.log_path})", value.log_tail()))
