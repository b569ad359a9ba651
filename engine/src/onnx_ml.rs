//! ai.onnx.ml operators that tract lacks, registered into its ONNX parser: `Scaler` (emitted by
//! skl2onnx for `StandardScaler`) and `TreeEnsembleRegressor` (XGBoost, LightGBM and
//! scikit-learn regressors through onnxmltools / skl2onnx).

use tract_onnx::model::{Onnx, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::change_axes::wire_with_rank_broadcast;
use tract_onnx::tract_core::ops::math::{add, mul};
use tract_onnx::tract_hir::internal::*;
use tract_onnx_opl::ml::tree::{Cmp, TreeEnsemble, TreeEnsembleData};
use tract_onnx_opl::ml::tree_ensemble_classifier::{TreeEnsembleClassifier, parse_aggregate};

pub fn register(onnx: &mut Onnx) {
    onnx.op_register.insert("Scaler", scaler);
    onnx.op_register.insert("TreeEnsembleRegressor", tree_regressor);
}

/// `y = (x - offset) * scale`, per feature (last axis) or for all features when one value.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Scaler {
    /// `-offset`, so the wiring is an addition.
    neg_offset: Arc<Tensor>,
    scale: Arc<Tensor>,
}

fn scaler(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let offset: Vec<f32> = node.get_attr_opt_vec("offset")?.unwrap_or_else(|| vec![0.0]);
    let scale: Vec<f32> = node.get_attr_opt_vec("scale")?.unwrap_or_else(|| vec![1.0]);
    let neg: Vec<f32> = offset.iter().map(|o| -o).collect();
    Ok((expand(Scaler { neg_offset: rctensor1(&neg), scale: rctensor1(&scale) }), vec![]))
}

impl Expansion for Scaler {
    fn name(&self) -> StaticName {
        "Scaler".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, DatumType::F32)?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let mut x = inputs[0];
        if model.outlet_fact(x)?.datum_type != f32::datum_type() {
            x = model.wire_node(
                format!("{prefix}.to_f32"),
                tract_onnx::tract_core::ops::cast::cast(f32::datum_type()),
                &[x],
            )?[0];
        }
        let offset = model.add_const(format!("{prefix}.offset"), self.neg_offset.clone())?;
        let scale = model.add_const(format!("{prefix}.scale"), self.scale.clone())?;
        let shifted = wire_with_rank_broadcast(format!("{prefix}.sub"), model, add(), &[x, offset])?[0];
        wire_with_rank_broadcast(format!("{prefix}.mul"), model, mul(), &[shifted, scale])
    }
}

/// Regression tree ensemble: `[N, n_targets]` scores, aggregated over trees, plus base values.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct TreeRegressor {
    ensemble: TreeEnsemble,
    base: Option<Arc<Tensor>>,
}

fn tree_regressor(_ctx: &ParsingContext, node: &NodeProto) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let n_targets: i64 = node.get_attr("n_targets")?;
    node.expect_attr("n_targets", n_targets > 0, "at least one target")?;
    let n_targets = n_targets as usize;
    if let Some(pt) = node.get_attr_opt::<&str>("post_transform")? {
        node.expect_attr("post_transform", pt == "NONE", "NONE (others are not supported for regressors)")?;
    }
    let aggregate = parse_aggregate(node.get_attr_opt("aggregate_function")?.unwrap_or("SUM"))?;
    let data = parse_trees(node)?;
    let max_feature = node.get_attr_slice::<i64>("nodes_featureids")?.iter().copied().max().unwrap_or(0) as usize;
    let ensemble = TreeEnsemble::build(data, max_feature, n_targets, aggregate)?;
    let base: Option<Vec<f32>> = node.get_attr_opt_vec("base_values")?;
    if let Some(b) = &base {
        node.expect_attr("base_values", b.len() == n_targets, "one value per target")?;
    }
    Ok((expand(TreeRegressor { ensemble, base: base.map(|b| rctensor1(&b)) }), vec![]))
}

/// Lays the ONNX node and leaf attribute arrays out the way tract's tree evaluator reads them
/// (the same layout tract builds for `TreeEnsembleClassifier`).
fn parse_trees(node: &NodeProto) -> TractResult<TreeEnsembleData> {
    let ints = |name: &str| -> TractResult<Vec<usize>> {
        Ok(node.get_attr_slice::<i64>(name)?.iter().map(|&v| v.max(0) as usize).collect())
    };
    let tree_ids = ints("nodes_treeids")?;
    let node_ids = ints("nodes_nodeids")?;
    let feature_ids = ints("nodes_featureids")?;
    let true_ids = ints("nodes_truenodeids")?;
    let false_ids = ints("nodes_falsenodeids")?;
    let values: Vec<f32> = node.get_attr_vec("nodes_values")?;
    let modes: Vec<&str> = node.get_attr_vec("nodes_modes")?.into_iter().collect();
    let n = tree_ids.len();
    node.expect(n > 0, "at least one node")?;
    for (name, len) in [
        ("nodes_nodeids", node_ids.len()),
        ("nodes_featureids", feature_ids.len()),
        ("nodes_truenodeids", true_ids.len()),
        ("nodes_falsenodeids", false_ids.len()),
        ("nodes_values", values.len()),
        ("nodes_modes", modes.len()),
    ] {
        node.expect_attr(name, len == n, "one entry per node")?;
    }
    let nan_true: Vec<bool> = match node.get_attr_opt_slice::<i64>("nodes_missing_value_tracks_true")? {
        Some(v) if v.len() == n => v.iter().map(|&x| x != 0).collect(),
        _ => vec![false; n],
    };
    let leaf_trees = ints("target_treeids")?;
    let leaf_nodes = ints("target_nodeids")?;
    let leaf_targets = ints("target_ids")?;
    let leaf_weights: Vec<f32> = node.get_attr_vec("target_weights")?;
    let m = leaf_trees.len();
    node.expect(
        m > 0 && leaf_nodes.len() == m && leaf_targets.len() == m && leaf_weights.len() == m,
        "consistent target arrays",
    )?;

    let mut node_order: Vec<usize> = (0..n).collect();
    node_order.sort_by_key(|&i| (tree_ids[i], node_ids[i]));
    let mut leaf_order: Vec<usize> = (0..m).collect();
    leaf_order.sort_by_key(|&i| (leaf_trees[i], leaf_nodes[i]));

    // Node ids must be 0..k within each tree for the index arithmetic below.
    let mut trees: Vec<u32> = vec![];
    let mut nodes: Vec<u32> = vec![];
    let mut leaves: Vec<u32> = vec![];
    let mut current = None;
    let mut next_in_tree = 0usize;
    let mut leaf_ix = 0usize;
    for &i in &node_order {
        if current != Some(tree_ids[i]) {
            current = Some(tree_ids[i]);
            trees.push(nodes.len() as u32 / 5);
            next_in_tree = 0;
        }
        node.expect(node_ids[i] == next_in_tree, "node ids numbered from 0 without gaps in each tree")?;
        next_in_tree += 1;
        let base = *trees.last().expect("tree started");
        let mode = match modes[i] {
            "BRANCH_LEQ" => Some(Cmp::LessEqual),
            "BRANCH_LT" => Some(Cmp::Less),
            "BRANCH_GTE" => Some(Cmp::GreaterEqual),
            "BRANCH_GT" => Some(Cmp::Greater),
            "BRANCH_EQ" => Some(Cmp::Equal),
            "BRANCH_NEQ" => Some(Cmp::NotEqual),
            "LEAF" => None,
            other => bail!("unsupported tree node mode {other}"),
        };
        let row = match mode {
            Some(mode) => [
                feature_ids[i] as u32,
                true_ids[i] as u32 + base,
                false_ids[i] as u32 + base,
                values[i].to_bits(),
                (0x0100u32 * nan_true[i] as u32) | mode as u32,
            ],
            None => {
                let start = leaves.len() as u32 / 2;
                while leaf_ix < m
                    && leaf_trees[leaf_order[leaf_ix]] == tree_ids[i]
                    && leaf_nodes[leaf_order[leaf_ix]] == node_ids[i]
                {
                    let l = leaf_order[leaf_ix];
                    leaves.push(leaf_targets[l] as u32);
                    leaves.push(leaf_weights[l].to_bits());
                    leaf_ix += 1;
                }
                [start, leaves.len() as u32 / 2, 0, 0, 0]
            }
        };
        nodes.extend(row);
    }
    node.expect(leaf_ix == m, "every target entry belongs to a leaf node")?;
    Ok(TreeEnsembleData {
        trees: rctensor1(&trees),
        nodes: tensor1(&nodes).into_shape(&[nodes.len() / 5, 5])?.into_arc_tensor(),
        leaves: tensor1(&leaves).into_shape(&[leaves.len() / 2, 2])?.into_arc_tensor(),
    })
}

impl Expansion for TreeRegressor {
    fn name(&self) -> StaticName {
        "TreeEnsembleRegressor".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, DatumType::F32)?;
        s.equals(&outputs[0].rank, 2)?;
        s.equals(&outputs[0].shape[0], &inputs[0].shape[0])?;
        s.equals(&outputs[0].shape[1], self.ensemble.n_classes().to_dim())?;
        Ok(())
    }

    fn wire(&self, prefix: &str, model: &mut TypedModel, inputs: &[OutletId]) -> TractResult<TVec<OutletId>> {
        let scores = model.wire_node(
            format!("{prefix}.trees"),
            TreeEnsembleClassifier { ensemble: self.ensemble.clone() },
            inputs,
        )?;
        match &self.base {
            Some(base) => {
                let base = model.add_const(format!("{prefix}.base"), base.clone())?;
                wire_with_rank_broadcast(format!("{prefix}.add_base"), model, add(), &[scores[0], base])
            }
            None => Ok(scores),
        }
    }
}
