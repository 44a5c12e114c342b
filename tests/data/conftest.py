"""Shared fixtures: one tiny `emoji_scenes` build (8 emoji at 16 px) for the whole session."""
import ml_collections
import pytest

TINY = dict(resolution=16, num_emoji=8, seed=0)


def tiny_data_config(data_dir, name="emoji_scenes") -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name=name, data_dir=str(data_dir), image_key="image", text_key="caption", **TINY))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  from unclip_jax.data import sources
  data_dir = tmp_path_factory.mktemp("tfds")
  sources.prepare_bundled("emoji_scenes", data_dir=str(data_dir), **TINY)
  return data_dir


@pytest.fixture(scope="session")
def tiny_train_source(tiny_data_dir):
  from unclip_jax.data import pipeline
  return pipeline.get_data_source(tiny_data_config(tiny_data_dir), "train")


def data_loader_iterator(source, *, global_batch_size, seed, process_index=0,
                         process_count=1, preprocess=None):
  """The train iterator as data/pipeline.py made it before it read whole batches (a
  grain DataLoader, until 206ffc7): the checkpoints it saved must still resume."""
  import grain
  from unclip_jax.data import pipeline
  sampler = grain.samplers.IndexSampler(
      num_records=len(source), shuffle=True, num_epochs=None, seed=seed,
      shard_options=grain.sharding.ShardOptions(
          shard_index=process_index, shard_count=process_count, drop_remainder=True))

  class ToModelInputs(grain.transforms.Map):
    def map(self, element):
      return pipeline.to_model_inputs(element, preprocess)

  batch = grain.transforms.Batch(global_batch_size // process_count,
                                 drop_remainder=True, batch_fn=pipeline.stack_records)
  return iter(grain.DataLoader(data_source=source, sampler=sampler,
                               operations=[ToModelInputs(), batch], worker_count=0))
