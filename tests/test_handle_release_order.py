"""GraphHandle's release order (cugraph_rt/handle_state.py), on the CPU with stand-ins: the static
outputs are dropped before any exec or graph is closed, so a graph giving its private pool back
finds the outputs' blocks already returned to it."""
import gc
import weakref

from cugraph_rt.handle_state import _Resources


class _Output:
    pass


class _Closes:
    def __init__(self, name, log, output_ref):
        self.name, self.log, self.output_ref = name, log, output_ref

    def close(self):
        self.log.append((self.name, self.output_ref() is None))


def _resources(log):
    res = _Resources()
    out = _Output()
    ref = weakref.ref(out)
    res.outputs[None] = out
    res.execs[None] = _Closes("exec", log, ref)
    res.graphs[None] = _Closes("graph", log, ref)
    del out
    return res, ref


def test_release_drops_outputs_before_closing_graphs():
    log = []
    res, ref = _resources(log)
    res.release()
    gc.collect()
    assert log == [("exec", True), ("graph", True)]
    assert ref() is None and not res.outputs and not res.graphs


def test_drop_graphs_drops_outputs_first_too():
    log = []
    res, ref = _resources(log)
    res.drop_graphs()
    assert log == [("exec", True), ("graph", True)]
    assert not res.pools and not res.outputs
