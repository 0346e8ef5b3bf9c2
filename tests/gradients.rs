//! Every trainable parameter of every task model receives a finite, non-zero gradient from its
//! training loss. Guards against ops without a backward pass (candle's fused LayerNorm and
//! softmax silently stop gradients) and against parameters left out of the graph.

mod common;

use albef::model::contrastive_model::mask_tokens;
use albef::model::{
    ClassifierKind, ClassifierModel, ContrastiveModel, ModelConfig, Objective, TextAssignModel, VqaModel,
};
use albef::nn::ParamStore;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;

fn tiny() -> ModelConfig {
    let mut cfg = common::model_config("retrieval");
    cfg.bert.vocab_size = 128;
    cfg
}

fn inputs(b: usize, l: usize, cfg: &ModelConfig) -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let r = cfg.vision.image_res;
    let image = Tensor::randn(0f32, 1.0, (b, 3, r, r), &dev).unwrap();
    let ids: Vec<i64> = (0..b * l).map(|i| if i % l == 0 { 101 } else { 1 + (i * 7 % 60) as i64 }).collect();
    let ids = Tensor::from_vec(ids, (b, l), &dev).unwrap();
    // Last token of the first row is padding, so masks are exercised.
    let mut mask = vec![1i64; b * l];
    mask[l - 1] = 0;
    (image, ids, Tensor::from_vec(mask, (b, l), &dev).unwrap())
}

fn assert_all_grads(what: &str, store: &ParamStore, loss: &Tensor) {
    let grads = loss.backward().unwrap();
    let mut checked = 0;
    for p in store.trainable() {
        let g = grads.get(&p.var).unwrap_or_else(|| panic!("{what}: {} received no gradient", p.name));
        let norm = g.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        assert!(norm.is_finite() && norm > 0.0, "{what}: gradient of {} has squared norm {norm}", p.name);
        checked += 1;
    }
    assert!(checked > 100, "{what}: only {checked} parameters checked");
}

#[test]
fn pretrain_and_retrieval_models_train_every_parameter() {
    let cfg = tiny();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (image, ids, mask) = inputs(4, 9, &cfg);
    let model = ContrastiveModel::new(&cfg, Objective::Pretrain, &Device::Cpu, 1).unwrap().with_mlm_probability(0.5);
    let (mlm_ids, labels) = mask_tokens(&ids, cfg.bert.vocab_size, 0.5, &mut rng).unwrap();
    assert!(
        labels.ge(0i64).unwrap().to_dtype(DType::F32).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0
    );
    let replay = albef::model::contrastive_model::Replay {
        neg_image: vec![1, 0, 3, 2],
        neg_text: vec![2, 3, 0, 1],
        mlm_ids: Some(mlm_ids),
        mlm_labels: Some(labels),
    };
    let losses = model.forward_train(&image, &ids, &mask, None, 0.4, Some(&replay), &mut rng, true).unwrap();
    assert_all_grads("pretrain", &model.store, &losses.total().unwrap());

    let model = ContrastiveModel::new(&cfg, Objective::Retrieval, &Device::Cpu, 1).unwrap();
    let idx = Tensor::new(&[0i64, 1, 1, 2], &Device::Cpu).unwrap();
    let losses = model.forward_train(&image, &ids, &mask, Some(&idx), 0.4, None, &mut rng, true).unwrap();
    assert_all_grads("retrieval", &model.store, &losses.total().unwrap());
}

#[test]
fn vqa_model_trains_every_parameter() {
    let cfg = tiny();
    let (image, ids, mask) = inputs(2, 6, &cfg);
    let model = VqaModel::new(&cfg, &Device::Cpu, 1).unwrap();
    let answers = Tensor::new(&[[101i64, 5, 102, 0], [101, 7, 8, 102], [101, 9, 102, 0]], &Device::Cpu).unwrap();
    let a_mask = answers.ne(0i64).unwrap().to_dtype(DType::I64).unwrap();
    let weights = Tensor::new(&[0.5f32, 0.5, 1.0], &Device::Cpu).unwrap();
    let loss = model.forward_train(&image, &ids, &mask, &answers, &a_mask, &weights, &[2, 1], 0.4, true).unwrap();
    assert_all_grads("vqa", &model.store, &loss);
}

#[test]
fn classifier_models_train_every_parameter() {
    let cfg = tiny();
    let (image, ids, mask) = inputs(2, 6, &cfg);
    let model = ClassifierModel::new(&cfg, ClassifierKind::VisualEntailment, &Device::Cpu, 1).unwrap();
    let loss =
        model.forward_train(&image, &ids, &mask, &Tensor::new(&[0i64, 2], &Device::Cpu).unwrap(), 0.4, true).unwrap();
    assert_all_grads("ve", &model.store, &loss);

    let mut cfg = cfg;
    cfg.bert.fusion_layer = 2;
    cfg.nlvr_layers = 6;
    let (image2, _, _) = inputs(4, 6, &cfg);
    let model = ClassifierModel::new(&cfg, ClassifierKind::Nlvr2, &Device::Cpu, 1).unwrap();
    let loss =
        model.forward_train(&image2, &ids, &mask, &Tensor::new(&[0i64, 1], &Device::Cpu).unwrap(), 0.4, true).unwrap();
    assert_all_grads("nlvr", &model.store, &loss);
}

#[test]
fn text_assignment_model_trains_every_parameter_it_uses() {
    let mut cfg = tiny();
    cfg.bert.fusion_layer = 2;
    cfg.nlvr_layers = 6;
    let (image, ids, mask) = inputs(4, 6, &cfg);
    let model = TextAssignModel::new(&cfg, &Device::Cpu, 1).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let loss = model.forward_train(&image, &ids, &mask, &mut rng, true).unwrap();
    let grads = loss.backward().unwrap();
    // vision_proj only picks the pairs (no gradient, as in the reference); text_proj and temp
    // are carried for checkpoint compatibility only.
    let unused = ["vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias", "temp"];
    for p in model.store.trainable().iter().filter(|p| !unused.contains(&p.name.as_str())) {
        let g = grads.get(&p.var).unwrap_or_else(|| panic!("ta: {} received no gradient", p.name));
        let n = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(n.is_finite() && n > 0.0, "ta: gradient of {} is {n}", p.name);
    }
}
