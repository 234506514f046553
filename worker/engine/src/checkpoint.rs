//! Sharded safetensors checkpoints: `model.safetensors.index.json` + shards, or one
//! `model.safetensors`. Files are memory-mapped; tensors are views into the mapping.

use anyhow::{bail, Context, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes of one file, memory-mapped or built into the binary.
pub type FileBytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Where the files of a model directory come from.
#[derive(Clone)]
pub enum ModelFiles {
    Dir(PathBuf),
    /// Files compiled into the binary (the embedded default model), by file name.
    Embedded(&'static [(&'static str, &'static [u8])]),
}

impl ModelFiles {
    pub fn describe(&self) -> String {
        match self {
            ModelFiles::Dir(dir) => dir.display().to_string(),
            ModelFiles::Embedded(_) => "<embedded model>".to_string(),
        }
    }

    pub fn exists(&self, name: &str) -> bool {
        match self {
            ModelFiles::Dir(dir) => dir.join(name).is_file(),
            ModelFiles::Embedded(files) => files.iter().any(|(n, _)| *n == name),
        }
    }

    /// Maps a file; `Ok(None)` when it does not exist.
    pub fn open(&self, name: &str) -> Result<Option<FileBytes>> {
        match self {
            ModelFiles::Dir(dir) => {
                let path = dir.join(name);
                if !path.is_file() {
                    return Ok(None);
                }
                let file = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
                // SAFETY: the checkpoint is treated as read-only; a file truncated or rewritten while
                // mapped is outside what any mmap-based loader can defend against.
                let map = unsafe { memmap2::Mmap::map(&file) }
                    .with_context(|| format!("cannot memory-map {}", path.display()))?;
                Ok(Some(Arc::new(map)))
            }
            ModelFiles::Embedded(files) => Ok(files
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, bytes)| Arc::new(*bytes) as FileBytes)),
        }
    }

    pub fn read_string(&self, name: &str) -> Result<Option<String>> {
        let Some(bytes) = self.open(name)? else {
            return Ok(None);
        };
        let text = std::str::from_utf8((*bytes).as_ref())
            .with_context(|| format!("{} in {} is not UTF-8", name, self.describe()))?;
        Ok(Some(text.to_string()))
    }
}

/// A tensor inside a mapped file.
#[derive(Clone)]
pub struct TensorRef {
    pub name: String,
    pub file: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    bytes: FileBytes,
    start: usize,
    end: usize,
}

impl TensorRef {
    pub fn data(&self) -> &[u8] {
        &(*self.bytes).as_ref()[self.start..self.end]
    }

    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn byte_len(&self) -> usize {
        self.end - self.start
    }

    /// Checks shape and dtype, naming the tensor and its file on mismatch.
    pub fn expect(&self, dtypes: &[Dtype], shape: &[usize]) -> Result<()> {
        if !dtypes.contains(&self.dtype) {
            bail!(
                "tensor `{}` in {} has dtype {:?}, expected one of {:?}",
                self.name,
                self.file,
                self.dtype,
                dtypes
            );
        }
        if self.shape != shape {
            bail!(
                "tensor `{}` in {} has shape {:?}, expected {:?}",
                self.name,
                self.file,
                self.shape,
                shape
            );
        }
        Ok(())
    }

    /// Reads a float tensor (F32, BF16 or F16) into f32.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        let data = self.data();
        Ok(match self.dtype {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            other => bail!(
                "tensor `{}` in {} has dtype {:?}, expected a float type",
                self.name,
                self.file,
                other
            ),
        })
    }
}

struct Shard {
    file: String,
    bytes: FileBytes,
    data_start: usize,
    tensors: HashMap<String, safetensors::tensor::TensorInfo>,
}

/// All tensors of a checkpoint, by name.
pub struct Checkpoint {
    source: String,
    shards: Vec<Shard>,
    location: HashMap<String, usize>,
}

impl Checkpoint {
    pub fn open(files: &ModelFiles) -> Result<Self> {
        let source = files.describe();
        let shard_names: Vec<String> = if let Some(index) = files.read_string("model.safetensors.index.json")? {
            shard_names_from_index(&index).with_context(|| format!("in {source}/model.safetensors.index.json"))?
        } else if files.exists("model.safetensors") {
            vec!["model.safetensors".to_string()]
        } else {
            bail!("{source} holds neither model.safetensors.index.json nor model.safetensors");
        };
        let mut shards = Vec::with_capacity(shard_names.len());
        let mut location = HashMap::new();
        for file in shard_names {
            let bytes = files
                .open(&file)?
                .with_context(|| format!("shard {file} named by the index is missing from {source}"))?;
            let (header_len, metadata) = SafeTensors::read_metadata((*bytes).as_ref()).map_err(|e| {
                anyhow::anyhow!("{source}/{file} is not a valid safetensors file (truncated or corrupt?): {e:?}")
            })?;
            let tensors: HashMap<String, safetensors::tensor::TensorInfo> = metadata
                .tensors()
                .into_iter()
                .map(|(name, info)| (name, info.clone()))
                .collect();
            for name in tensors.keys() {
                location.insert(name.clone(), shards.len());
            }
            shards.push(Shard {
                file,
                bytes,
                data_start: 8 + header_len,
                tensors,
            });
        }
        Ok(Checkpoint {
            source,
            shards,
            location,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &String> {
        self.location.keys()
    }

    pub fn get(&self, name: &str) -> Result<TensorRef> {
        let &shard_index = self
            .location
            .get(name)
            .with_context(|| format!("tensor `{name}` is missing from the checkpoint in {}", self.source))?;
        let shard = &self.shards[shard_index];
        let info = &shard.tensors[name];
        Ok(TensorRef {
            name: name.to_string(),
            file: format!("{}/{}", self.source, shard.file),
            dtype: info.dtype,
            shape: info.shape.clone(),
            bytes: shard.bytes.clone(),
            start: shard.data_start + info.data_offsets.0,
            end: shard.data_start + info.data_offsets.1,
        })
    }

    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| (*s.bytes).as_ref().len() as u64).sum()
    }
}

fn shard_names_from_index(index: &str) -> Result<Vec<String>> {
    let value: serde_json::Value = serde_json::from_str(index).context("index is not valid JSON")?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .context("index has no `weight_map` object")?;
    let mut names = BTreeSet::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .with_context(|| format!("`weight_map.{tensor}` must be a file name"))?;
        if file.contains('/') || file.contains("..") {
            bail!("`weight_map.{tensor}` names `{file}`, which is outside the model directory");
        }
        names.insert(file.to_string());
    }
    Ok(names.into_iter().collect())
}

/// Whether the checkpoint in `files` holds tensor `name`: by its shard index when it has one
/// (no shard is opened), else by the single file's header.
pub fn holds_tensor(files: &ModelFiles, name: &str) -> Result<bool> {
    if let Some(index) = files.read_string("model.safetensors.index.json")? {
        let value: serde_json::Value = serde_json::from_str(&index)
            .with_context(|| format!("{}/model.safetensors.index.json is not valid JSON", files.describe()))?;
        return Ok(value.get("weight_map").and_then(|m| m.get(name)).is_some());
    }
    Ok(Checkpoint::open(files)?.contains(name))
}

/// Convenience for `Checkpoint::open(&ModelFiles::Dir(..))`.
pub fn open_dir(dir: &Path) -> Result<Checkpoint> {
    Checkpoint::open(&ModelFiles::Dir(dir.to_path_buf()))
}
