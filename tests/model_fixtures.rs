//! Evaluation outputs of every fixture set, reproduced from `checkpoint.pth` and from
//! `weights.safetensors` within 1e-5.

mod common;

use albef::checkpoint::{load_into, read_checkpoint};
use albef::eval::retrieval::{score_matrices, EncodedSplit};
use albef::model::{ClassifierKind, ClassifierModel, ContrastiveModel, Objective, VqaModel};
use candle_core::{Device, IndexOp, Tensor};
use common::*;

const TOL: f32 = 1e-5;
const FILES: [&str; 2] = ["checkpoint.pth", "weights.safetensors"];

fn load(store: &albef::nn::ParamStore, set: &str, file: &str) {
    let ckpt = read_checkpoint(&fixture_dir(set).join(file), &Device::Cpu).unwrap();
    let report = load_into(store, &ckpt.tensors).unwrap();
    assert!(report.missing.is_empty(), "{set}/{file}: missing {:?}", report.missing);
    assert!(report.unexpected.is_empty(), "{set}/{file}: unexpected {:?}", report.unexpected);
}

fn contrastive(set: &str, objective: Objective, file: &str) -> ContrastiveModel {
    let model = ContrastiveModel::new(&model_config(set), objective, &Device::Cpu, 0).unwrap();
    load(&model.store, set, file);
    model
}

/// ITM logits for every (image i, text j) pair: (N_img, N_txt, 2).
fn all_pair_itm(model: &ContrastiveModel, image_embeds: &Tensor, text_embeds: &Tensor, mask: &Tensor) -> Tensor {
    let (ni, nt) = (image_embeds.dim(0).unwrap(), text_embeds.dim(0).unwrap());
    let mut rows = Vec::new();
    for i in 0..ni {
        let img = image_embeds.i(i..i + 1).unwrap().repeat((nt, 1, 1)).unwrap();
        let fused = model.fuse(text_embeds, mask, &img).unwrap();
        rows.push(model.itm_logits(&fused).unwrap());
    }
    Tensor::stack(&rows, 0).unwrap()
}

#[test]
fn pretrain_eval_outputs() {
    let io = io("pretrain");
    for file in FILES {
        let model = contrastive("pretrain", Objective::Pretrain, file);
        let (image_embeds, image_feat) = model.encode_image(&io["image"]).unwrap();
        assert_close("image_embeds", &image_embeds, &io["image_embeds"], TOL);
        assert_close("image_feat", &image_feat, &io["image_feat"], TOL);
        let mask = &io["attention_mask"];
        let (text_embeds, text_feat) = model.encode_text(&io["input_ids"], mask).unwrap();
        assert_close("text_embeds", &text_embeds, &io["text_embeds"], TOL);
        assert_close("text_feat", &text_feat, &io["text_feat"], TOL);
        let sim = image_feat.matmul(&text_feat.t().unwrap()).unwrap().broadcast_div(&model.temp()).unwrap();
        assert_close("sim_i2t", &sim, &io["sim_i2t"], TOL);
        let fused = model.fuse(&text_embeds, mask, &image_embeds).unwrap();
        assert_close("fusion_hidden_pos", &fused, &io["fusion_hidden_pos"], TOL);
        assert_close("itm_logits", &all_pair_itm(&model, &image_embeds, &text_embeds, mask), &io["itm_logits"], TOL);
        let logits = model.mlm_logits(&io["mlm_input_ids"], mask, &image_embeds).unwrap();
        let pos = io["mlm_positions"].to_vec2::<i64>().unwrap();
        let at_masks: Vec<Tensor> = pos.iter().map(|p| logits.i((p[0] as usize, p[1] as usize)).unwrap()).collect();
        assert_close("mlm_logits_masked", &Tensor::stack(&at_masks, 0).unwrap(), &io["mlm_logits_masked"], TOL);
        let argmax = logits.argmax(2).unwrap().to_dtype(candle_core::DType::I64).unwrap();
        assert_eq!(argmax.to_vec2::<i64>().unwrap(), io["mlm_argmax"].to_vec2::<i64>().unwrap(), "mlm_argmax");
    }
}

#[test]
fn retrieval_eval_outputs() {
    let io = io("retrieval");
    for file in FILES {
        let model = contrastive("retrieval", Objective::Retrieval, file);
        let (image_feats, image_embeds) = model.encode_image(&io["image"]).unwrap();
        assert_close("image_feats", &image_feats, &io["image_feats"], TOL);
        assert_close("image_embeds", &image_embeds, &io["image_embeds"], TOL);
        let mask = &io["attention_mask"];
        let (text_feats, text_embeds) = model.encode_text(&io["input_ids"], mask).unwrap();
        assert_close("text_feats", &text_feats, &io["text_feats"], TOL);
        assert_close("text_embeds", &text_embeds, &io["text_embeds"], TOL);
        let sims = image_embeds.matmul(&text_embeds.t().unwrap()).unwrap();
        assert_close("sims_matrix", &sims, &io["sims_matrix"], TOL);
        assert_close("itm_logits", &all_pair_itm(&model, &image_feats, &text_feats, mask), &io["itm_logits"], TOL);
        let enc = EncodedSplit {
            image_states: image_feats,
            image_feat: image_embeds,
            text_states: text_feats,
            text_mask: mask.clone(),
            text_feat: text_embeds,
        };
        let k_test = manifest("retrieval")["config"]["task_config"]["k_test"].as_u64().unwrap() as usize;
        let (i2t, t2i) = score_matrices(&model, &enc, k_test).unwrap();
        assert_close("score_matrix_i2t", &Tensor::new(i2t, &Device::Cpu).unwrap(), &io["score_matrix_i2t"], TOL);
        assert_close("score_matrix_t2i", &Tensor::new(t2i, &Device::Cpu).unwrap(), &io["score_matrix_t2i"], TOL);
    }
}

#[test]
fn ve_eval_outputs() {
    let io = io("ve");
    for file in FILES {
        let model =
            ClassifierModel::new(&model_config("ve"), ClassifierKind::VisualEntailment, &Device::Cpu, 0).unwrap();
        load(&model.store, "ve", file);
        let logits = model.logits(&io["image"], &io["input_ids"], &io["attention_mask"]).unwrap();
        assert_close("ve logits", &logits, &io["logits"], TOL);
    }
}

#[test]
fn nlvr_eval_outputs() {
    let io = io("nlvr");
    for file in FILES {
        let model = ClassifierModel::new(&model_config("nlvr"), ClassifierKind::Nlvr2, &Device::Cpu, 0).unwrap();
        load(&model.store, "nlvr", file);
        let image = Tensor::cat(&[&io["image0"], &io["image1"]], 0).unwrap();
        let logits = model.logits(&image, &io["input_ids"], &io["attention_mask"]).unwrap();
        assert_close("nlvr logits", &logits, &io["logits"], TOL);
    }
}

#[test]
fn vqa_eval_outputs() {
    let io = io("vqa");
    let k = 3;
    for file in FILES {
        let model = VqaModel::new(&model_config("vqa"), &Device::Cpu, 0).unwrap();
        load(&model.store, "vqa", file);
        let image_embeds = model.image_embeds(&io["image"]).unwrap();
        assert_close("image_embeds", &image_embeds, &io["image_embeds"], TOL);
        let q_mask = &io["question_mask"];
        let q = model.question_states(&io["image"], &io["question_ids"], q_mask).unwrap();
        assert_close("question_states", &q, &io["question_states"], TOL);
        let ranking = model.rank_answers(&q, q_mask, &io["answer_ids"], &io["answer_mask"], k).unwrap();
        assert_close("first_token_logits", &ranking.first_token_logits, &io["first_token_logits"], TOL);
        let ids: Vec<Vec<i64>> = ranking.ids.iter().map(|r| r.iter().map(|&x| x as i64).collect()).collect();
        assert_eq!(ids, io["topk_ids"].to_vec2::<i64>().unwrap(), "topk_ids");
        let probs = Tensor::new(ranking.probs.clone(), &Device::Cpu).unwrap();
        assert_close("topk_probs", &probs, &io["topk_probs"], TOL);
        let ll = model.answer_loglik(&q, q_mask, &io["answer_ids"], &io["answer_mask"]).unwrap();
        assert_close("answer_loglik", &ll, &io["answer_loglik"], TOL);
    }
}
