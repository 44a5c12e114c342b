"""One of two processes, 4 CPU devices each, joined by jax.distributed (the
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID variables): two
CLIP train steps on a (2, 4, 1) mesh over all 8 devices, each process feeding
its half of the batch, checked against the same steps on one local device.
Exit 0 when they agree. Run by test_two_processes.py."""
import ml_collections

from unclip_jax.parallel import distributed


def main():
  distributed.initialize(ml_collections.ConfigDict())  # from the environment
  import jax  # pylint: disable=import-outside-toplevel
  assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
  from tests.stages import sharded_steps, test_clip_sharded  # pylint: disable=import-outside-toplevel
  stage = test_clip_sharded.make_stage()
  batch = test_clip_sharded.make_batch(stage.config)
  initial, expected = sharded_steps.reference_steps(stage, batch)
  mesh_shape = (2, 4, 1)
  got, live = sharded_steps.two_steps(stage, batch, mesh_shape, initial)
  assert not any(leaf.is_fully_addressable for leaf in jax.tree.leaves(live.params)
                 if leaf.size >= 1024), "params should span both processes"
  sharded_steps.assert_steps_match(expected, got, live, mesh_shape)
  print(f"process {jax.process_index()}: two-process steps match one device",
        flush=True)


if __name__ == "__main__":
  main()
