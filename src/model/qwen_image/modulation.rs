//! Qwen-Image's modulation computed once for a schedule. Every block's `img_mod` and
//! `txt_mod` linears and `norm_out.linear` act on `silu(temb)`, and `temb` on the timestep
//! alone, so for the σ of every step their outputs can be computed in one pass before the
//! steps ([`QwenImageModulation::table`]); the steps then run a [`QwenImage`] made with
//! [`QwenImage::precomputed`], whose groups leave those weights (about a third of the
//! model's bytes) out, and take the vectors from the [`ModulationTable`].
//!
//! The table holds the same bits as a pass computes: both embed each distinct σ as one row
//! (`[1, dim]`) through the same linears, and a step uploads the rows the backend handed back
//! (bf16 on the GPU, widened exactly to f32 and narrowed exactly again).

use super::{
    linear_specs, timestep_embedder, timestep_specs, QwenImage, QwenImageConfig, Sigmas,
    IMAGE_NAMES, TEXT_NAMES, T_FREQ_DIM,
};
use crate::backend::dit::DitOps;
use crate::error::{Error, Result};
use crate::model::mmdit::append_outputs;
use crate::model::{Architecture, Bound, PassCost, PassShape, WeightGroup, Weights};

/// The model of a Qwen-Image DiT's timestep-only weights: the timestep embedder, each block's
/// two modulation linears, `norm_out.linear`, one group each.
pub struct QwenImageModulation {
    pub config: QwenImageConfig,
    groups: Vec<WeightGroup>,
}

/// The modulation vectors of every block and the final norm for each σ of a schedule.
#[derive(Clone, Debug)]
pub struct ModulationTable {
    dim: usize,
    blocks: usize,
    /// Each σ and its vectors: block 0's image stream (`6·dim`), its text stream (`6·dim`),
    /// block 1's, …, then `norm_out`'s (`2·dim`).
    entries: Vec<(f32, Vec<f32>)>,
}

/// One σ's vectors.
pub(super) struct Entry<'t> {
    dim: usize,
    values: &'t [f32],
}

impl Entry<'_> {
    /// Block `block`'s vectors for stream `stream` (0 the image, 1 the text), `6·dim`.
    pub fn stream(&self, block: usize, stream: usize) -> &[f32] {
        let w = 6 * self.dim;
        let start = (2 * block + stream) * w;
        &self.values[start..start + w]
    }

    /// `norm_out`'s scale and shift, `2·dim`.
    pub fn norm_out(&self) -> &[f32] {
        &self.values[self.values.len() - 2 * self.dim..]
    }
}

impl ModulationTable {
    /// The σ the table holds, in the order given.
    pub fn sigmas(&self) -> impl Iterator<Item = f32> + '_ {
        self.entries.iter().map(|(s, _)| *s)
    }

    /// Host bytes the table takes.
    pub fn bytes(&self) -> usize {
        self.entries.iter().map(|(_, v)| v.len() * 4).sum()
    }

    /// The entries of `sigmas` for a DiT of `config`.
    pub(super) fn entries(
        &self,
        config: &QwenImageConfig,
        sigmas: &Sigmas,
    ) -> Result<Vec<Entry<'_>>> {
        if (self.dim, self.blocks) != (config.dim(), config.num_layers) {
            return Err(Error::Flag {
                flag: "modulation table",
                message: format!(
                    "made for {} blocks of width {}; expected {} of {} (another model's table)",
                    self.blocks,
                    self.dim,
                    config.num_layers,
                    config.dim()
                ),
            });
        }
        sigmas
            .values
            .iter()
            .map(|&sigma| {
                let found = self.entries.iter().find(|(s, _)| s.to_bits() == sigma.to_bits());
                match found {
                    Some((_, values)) => Ok(Entry {
                        dim: self.dim,
                        values,
                    }),
                    None => Err(Error::Flag {
                        flag: "modulation table",
                        message: format!(
                            "holds no vectors for σ = {sigma}; expected one of the σ it was made for ({})",
                            self.sigmas().map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
                        ),
                    }),
                }
            })
            .collect()
    }
}

impl QwenImageModulation {
    pub fn new(config: QwenImageConfig) -> QwenImageModulation {
        let dim = config.dim();
        let mut te = Vec::new();
        timestep_specs(&mut te, dim);
        let mut groups = vec![WeightGroup::new("timestep embedder", te)];
        for i in 0..config.num_layers {
            let mut t = Vec::new();
            for n in [&IMAGE_NAMES, &TEXT_NAMES] {
                let name = format!("transformer_blocks.{i}.{}", n.modulation);
                linear_specs(&mut t, name, 6 * dim, dim);
            }
            groups.push(WeightGroup::new(format!("block {i} modulation"), t));
        }
        let mut last = Vec::new();
        linear_specs(&mut last, "norm_out.linear".into(), 2 * dim, dim);
        groups.push(WeightGroup::new("norm_out modulation", last));
        QwenImageModulation { config, groups }
    }

    /// The vectors for each of `sigmas` (the pipeline's `timestep / 1000` of every step; a
    /// σ given twice is computed once), each weight asked for once.
    pub fn table<B: DitOps>(
        &self,
        backend: &B,
        weights: &mut impl Weights<B::Weight>,
        sigmas: &[f32],
    ) -> Result<ModulationTable> {
        let c = &self.config;
        let dim = c.dim();
        let sigmas = Sigmas::of(sigmas).values;
        if sigmas.is_empty() {
            return Err(Error::Flag {
                flag: "modulation table",
                message: "no σ given; expected one per step".into(),
            });
        }
        let mut entries: Vec<(f32, Vec<f32>)> = sigmas
            .iter()
            .map(|&s| (s, Vec::with_capacity((12 * c.num_layers + 2) * dim)))
            .collect();
        let silu = {
            let w = Bound::new(&self.groups[0], weights.group(0)?);
            let te = timestep_embedder(&w);
            sigmas
                .iter()
                .map(|&s| te.embed(backend, s).map(|(_, silu)| silu))
                .collect::<Result<Vec<_>>>()?
        };
        // Every σ's output of the linear `name` of group `g`, appended to its entry.
        let mut append = |g: usize, names: &[String], ws: &[B::Weight]| {
            let w = Bound::new(&self.groups[g], ws);
            append_outputs(backend, &silu, &w, names, &mut entries)
        };
        for i in 0..c.num_layers {
            let names = [&IMAGE_NAMES, &TEXT_NAMES]
                .map(|n| format!("transformer_blocks.{i}.{}", n.modulation));
            append(1 + i, &names, weights.group(1 + i)?)?;
        }
        let last = 1 + c.num_layers;
        append(last, &["norm_out.linear".to_string()], weights.group(last)?)?;
        weights.finish_pass()?;
        Ok(ModulationTable {
            dim,
            blocks: c.num_layers,
            entries,
        })
    }
}

impl QwenImage {
    /// Parameters of the weights a [`Modulation::Precomputed`](super::Modulation) pass
    /// leaves out.
    pub fn modulation_params(&self) -> usize {
        QwenImageModulation::new(self.config.clone())
            .groups
            .iter()
            .flat_map(|g| &g.tensors)
            .map(|t| t.numel())
            .sum()
    }
}

impl Architecture for QwenImageModulation {
    /// The timestep embedder, each block's modulation, `norm_out`'s.
    fn groups(&self) -> &[WeightGroup] {
        &self.groups
    }

    /// `shape.batch` is the number of σ (one row each).
    fn pass_cost(&self, shape: PassShape) -> PassCost {
        let (dim, n) = (self.config.dim() as f64, shape.batch.max(1) as f64);
        let mut flops = vec![n * 2.0 * (T_FREQ_DIM as f64 * dim + dim * dim)];
        flops.extend(std::iter::repeat_n(
            n * 2.0 * 2.0 * 6.0 * dim * dim,
            self.config.num_layers,
        ));
        flops.push(n * 2.0 * 2.0 * dim * dim);
        // Every σ's two outputs of a block (bf16 on the GPU) and their joined copy, beside
        // the σ's silu(temb); 1 MiB for the rest.
        let workspace = shape.batch.max(1) * (3 * 6 * self.config.dim() + dim as usize) * 2 * 2;
        PassCost {
            flops,
            workspace: workspace + (1 << 20),
            cache: 0,
        }
    }
}
