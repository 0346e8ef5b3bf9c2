//! A WebDataset tar shard: read member by member as the streaming loader does, and each sample
//! decoded into a pre-training item (caption from .txt/.json, image through the image loader).
#![no_main]
use albef::data::pretrain::shard_sample;
use albef::data::shards::read_shard;
use libfuzzer_sys::fuzz_target;
use rand::SeedableRng;

fuzz_target!(|data: &[u8]| {
    let shard = albef_fuzz::put("shard-000000.tar", data);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let _ = read_shard(&shard, 0, |sample| {
        let _ = shard_sample(&sample, 32, true, &mut rng);
        true
    });
});
