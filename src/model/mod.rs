//! Model architectures, written once over the [`Backend`](crate::backend::Backend) interface.
//!
//! An architecture describes itself to the engine through [`Architecture`]: its weight
//! groups in pass order (named tensors with shapes, which may split by rows) and what a pass
//! of a given shape costs. It runs its forward by asking for each group's weights in turn and
//! binds them by name ([`Bound`]); where those weights live (resident, streamed through a
//! slot, in host memory) is not its business.

pub mod clip;
pub mod flux;
pub mod llama;
mod mmdit;
pub mod qwen_image;
mod rope_memo;
pub mod t5;
pub mod vae;
pub mod z_image;

pub use llama::{
    Arch, Checkpoint, Llama, Llama3RopeScaling, LlamaConfig, Logits, Output, Segment,
    MLP_CHUNK_ROWS,
};

use crate::checkpoint::{HostTensor, Tensors};
use crate::error::Result;

/// A tensor the model needs, with the shape it must have.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    /// The checkpoint's name (`model.layers.3.self_attn.q_proj.weight`).
    pub name: String,
    pub shape: Vec<usize>,
    /// The model can compute with this tensor in blocks of its rows (the head's vocabulary
    /// rows): the engine may stream it in pieces. Only the last tensor of a group may split;
    /// the tensors before it come with the first piece.
    pub split_rows: bool,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, shape: &[usize]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            shape: shape.to_vec(),
            split_rows: false,
        }
    }

    /// This tensor may be computed in blocks of rows.
    pub fn split_rows(mut self) -> TensorSpec {
        self.split_rows = true;
        self
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A set of weights used together, in pass order.
#[derive(Clone, Debug)]
pub struct WeightGroup {
    /// For people: "block 3", "head", "context refiner 0".
    pub label: String,
    pub tensors: Vec<TensorSpec>,
    /// The group is a table of which a pass reads a few rows (a token embedding): it stays in
    /// host memory and only those rows go to the device.
    pub host_gather: bool,
}

impl WeightGroup {
    pub fn new(label: impl Into<String>, tensors: Vec<TensorSpec>) -> WeightGroup {
        WeightGroup {
            label: label.into(),
            tensors,
            host_gather: false,
        }
    }

    /// Bytes of this group's tensors in `ckpt`.
    pub fn bytes(&self, ckpt: &Checkpoint) -> usize {
        self.tensors
            .iter()
            .filter_map(|t| ckpt.tensors.get(&t.name))
            .map(|t| t.bytes().len())
            .sum()
    }

    /// Whether the engine may stream this group in pieces (its last tensor splits by rows).
    pub fn splits(&self) -> bool {
        self.tensors.last().is_some_and(|t| t.split_rows)
    }
}

/// The shape of one pass: `tokens` new positions in each of `batch` sequences that already
/// hold `past` positions (0 for a prompt pass or a denoising step; the context so far for
/// decode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassShape {
    pub tokens: usize,
    pub batch: usize,
    pub past: usize,
}

impl PassShape {
    /// Rows of every activation: tokens × batch.
    pub fn rows(&self) -> usize {
        self.tokens * self.batch
    }
}

/// What one pass of a shape costs, for the planner.
#[derive(Clone, Debug, PartialEq)]
pub struct PassCost {
    /// FLOPs of each group, in pass order.
    pub flops: Vec<f64>,
    /// Activation memory of the pass on a GPU backend (bf16 activations), bytes.
    pub workspace: usize,
    /// Cache the pass needs (keys and values of every layer for every position), bytes.
    pub cache: usize,
}

/// An architecture as the engine sees it.
pub trait Architecture {
    /// Weight groups in pass order.
    fn groups(&self) -> &[WeightGroup];
    /// FLOPs, workspace and cache of one pass of `shape`.
    fn pass_cost(&self, shape: PassShape) -> PassCost;

    /// Check that `tensors` holds every tensor of every group, with its shape.
    fn check_tensors(&self, tensors: &dyn Tensors) -> Result<()> {
        for spec in self.groups().iter().flat_map(|g| &g.tensors) {
            tensors.tensor(&spec.name)?.expect_shape(&spec.shape)?;
        }
        Ok(())
    }
}

/// Hands the model the weights of one group at a time. The CPU path keeps every group
/// resident; the streaming engine hands out weights that it copied into a slot.
pub trait Weights<W> {
    /// The weights of group `index`, in the order of its `tensors`.
    fn group(&mut self, index: usize) -> Result<&[W]>;

    /// In how many parts group `index` comes when it is too large to be on the device at
    /// once (a group whose last tensor splits by rows, streamed in pieces). Each part is a
    /// block of rows of the group's last tensor, in order; 1 when the group comes whole.
    fn parts(&mut self, index: usize) -> Result<usize> {
        let _ = index;
        Ok(1)
    }

    /// Part `part` of group `index` (see [`parts`](Self::parts)), in the order of its
    /// `tensors`: `None` for a tensor that lies in another part; the last tensor is the block
    /// of its rows in this part. Ask for the parts in order.
    fn part(&mut self, index: usize, part: usize) -> Result<Vec<Option<&W>>> {
        debug_assert_eq!(part, 0, "a whole group has one part");
        Ok(self.group(index)?.iter().map(Some).collect())
    }

    /// The pass has queued all its work on these weights (the streaming engine frees the last
    /// slot for the next pass's prefetch).
    fn finish_pass(&mut self) -> Result<()> {
        Ok(())
    }
}

impl<W, T: Weights<W> + ?Sized> Weights<W> for Box<T> {
    fn group(&mut self, index: usize) -> Result<&[W]> {
        (**self).group(index)
    }
    fn parts(&mut self, index: usize) -> Result<usize> {
        (**self).parts(index)
    }
    fn part(&mut self, index: usize, part: usize) -> Result<Vec<Option<&W>>> {
        (**self).part(index, part)
    }
    fn finish_pass(&mut self) -> Result<()> {
        (**self).finish_pass()
    }
}

/// A group's weights bound to their names: the model asks for `"…q_proj.weight"`, never for
/// the third tensor.
pub struct Bound<'a, W> {
    group: &'a WeightGroup,
    weights: Vec<Option<&'a W>>,
}

impl<'a, W> Bound<'a, W> {
    /// `weights` in the order of `group.tensors`.
    pub fn new(group: &'a WeightGroup, weights: &'a [W]) -> Bound<'a, W> {
        Self::parts(group, weights.iter().map(Some).collect())
    }

    /// One part of a group that streams in pieces: `None` where a tensor lies in another
    /// part (see [`Weights::part`]).
    pub fn parts(group: &'a WeightGroup, weights: Vec<Option<&'a W>>) -> Bound<'a, W> {
        assert_eq!(
            group.tensors.len(),
            weights.len(),
            "{}: one weight per tensor",
            group.label
        );
        Bound { group, weights }
    }

    /// The weight called `name`, if this part holds it.
    pub fn opt(&self, name: &str) -> Option<&'a W> {
        let i = self.group.tensors.iter().position(|t| t.name == name)?;
        self.weights[i]
    }

    /// The weight called `name`. The model asks only for what its groups list, so a miss is
    /// a bug, not bad input (the checkpoint was checked against the groups at open).
    pub fn get(&self, name: &str) -> &'a W {
        self.opt(name).unwrap_or_else(|| {
            panic!(
                "{}: no tensor {name:?} in this group or part",
                self.group.label
            )
        })
    }
}

/// Every group made ready up front.
pub struct ResidentWeights<W> {
    groups: Vec<Vec<W>>,
}

impl<W> ResidentWeights<W> {
    pub fn load(
        ckpt: &dyn Tensors,
        groups: &[WeightGroup],
        mut make: impl FnMut(&HostTensor) -> Result<W>,
    ) -> Result<Self> {
        let groups = groups
            .iter()
            .map(|g| {
                g.tensors
                    .iter()
                    .map(|t| make(ckpt.tensor(&t.name)?))
                    .collect()
            })
            .collect::<Result<_>>()?;
        Ok(ResidentWeights { groups })
    }
}

impl<W> Weights<W> for ResidentWeights<W> {
    fn group(&mut self, index: usize) -> Result<&[W]> {
        Ok(&self.groups[index])
    }
}
