//! How a request's sampling travels from the scheduler to the rank that picks its tokens: the
//! one home of the conversion both ways between [`SamplingParams`] and the contract's
//! [`SamplingSpec`].

use dsv3_engine::{LogitRules, OutputGrammar, SamplingParams};
use dsv3_proto::{SamplingSpec, TokenBias};

/// The spec of one pick. `end_ids`: the tokens that end the sequence (banned until
/// `min_tokens`); `generated_before`: output tokens the sequence was prefilled with; `first`:
/// the sequence's first pick since (re)admission, the only one that carries the logit rules and
/// the grammar (the rank keeps them with the sequence).
pub fn to_spec(
    params: &SamplingParams,
    logprobs: Option<usize>,
    generated_before: usize,
    end_ids: Vec<u32>,
    first: bool,
) -> SamplingSpec {
    let r = &params.rules;
    let grammar = params.grammar.as_ref().filter(|_| first);
    SamplingSpec {
        temperature: params.temperature,
        top_k: params.top_k.min(u32::MAX as usize) as u32,
        top_p: params.top_p,
        seed: params.seed,
        logprobs: logprobs.map(|n| n.min(u32::MAX as usize) as u32),
        generated_before: generated_before as u32,
        rules: (first && r.is_active()).then(|| dsv3_proto::LogitRules {
            presence_penalty: r.presence_penalty,
            frequency_penalty: r.frequency_penalty,
            repetition_penalty: r.repetition_penalty,
            logit_bias: r.logit_bias.iter().map(|&(id, bias)| TokenBias { id, bias }).collect(),
            min_tokens: r.min_tokens.min(u32::MAX as usize) as u32,
            end_ids,
        }),
        json_schema: match grammar {
            Some(OutputGrammar::JsonSchema(schema)) => Some(schema.clone()),
            _ => None,
        },
        lark: match grammar {
            Some(OutputGrammar::Lark(grammar)) => Some(grammar.clone()),
            _ => None,
        },
    }
}

/// The parameters a rank's sampler needs from `spec`, and the end ids of its rules.
pub fn from_spec(spec: &SamplingSpec) -> (SamplingParams, Vec<u32>) {
    let (rules, end_ids) = match &spec.rules {
        None => (LogitRules::default(), Vec::new()),
        Some(r) => (
            LogitRules {
                presence_penalty: r.presence_penalty,
                frequency_penalty: r.frequency_penalty,
                repetition_penalty: r.repetition_penalty,
                logit_bias: r.logit_bias.iter().map(|b| (b.id, b.bias)).collect(),
                min_tokens: r.min_tokens as usize,
            },
            r.end_ids.clone(),
        ),
    };
    let params = SamplingParams {
        temperature: spec.temperature,
        top_k: spec.top_k as usize,
        top_p: spec.top_p,
        seed: spec.seed,
        rules,
        grammar: grammar_of(spec),
        ..SamplingParams::default()
    };
    (params, end_ids)
}

/// The grammar a spec carries, if any.
pub fn grammar_of(spec: &SamplingSpec) -> Option<OutputGrammar> {
    match (&spec.json_schema, &spec.lark) {
        (Some(schema), _) => Some(OutputGrammar::JsonSchema(schema.clone())),
        (None, Some(grammar)) => Some(OutputGrammar::Lark(grammar.clone())),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_scheduler_sends_the_rank_reads_back() {
        let params = SamplingParams {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            seed: Some(u64::MAX - 3),
            rules: LogitRules {
                presence_penalty: 0.5,
                frequency_penalty: -0.25,
                repetition_penalty: 1.2,
                logit_bias: vec![(3, -100.0), (17, 2.5)],
                min_tokens: 9,
            },
            grammar: Some(OutputGrammar::JsonSchema(r#"{"type": "object"}"#.into())),
            ..SamplingParams::default()
        };
        let spec = to_spec(&params, Some(4), 2, vec![1, 2], true);
        // Through the wire format, as gRPC carries it.
        let spec =
            <SamplingSpec as prost::Message>::decode(prost::Message::encode_to_vec(&spec).as_slice()).expect("decode");
        let (back, end_ids) = from_spec(&spec);
        assert_eq!(end_ids, [1, 2]);
        assert_eq!(
            (back.temperature, back.top_k, back.top_p, back.seed),
            (0.7, 40, 0.9, params.seed)
        );
        assert_eq!((&back.rules, &back.grammar), (&params.rules, &params.grammar));
        assert_eq!((spec.logprobs, spec.generated_before), (Some(4), 2));
        // No rules: nothing on the wire, the default back.
        // Later picks carry neither: the rank keeps them from the first.
        let later = to_spec(&params, None, 0, vec![1, 2], false);
        assert!(later.rules.is_none() && later.json_schema.is_none() && later.lark.is_none());
        let plain = to_spec(&SamplingParams::default(), None, 0, vec![1], true);
        assert!(plain.rules.is_none());
        assert!(!from_spec(&plain).0.rules.is_active());
    }
}
