//! A policy's test vectors (`policies/ABI.md`, "Test vectors"): the cases a module must pass
//! before a gateway activates it.

use std::fmt;

use hotpath_core::rejection::PolicyCode;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{Evaluation, Policy};

/// How a policy did on its vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct VectorReport {
    pub passed: usize,
    pub failed: Vec<VectorFailure>,
}

impl VectorReport {
    /// Whether every vector passed.
    pub fn ok(&self) -> bool {
        self.failed.is_empty()
    }
}

/// One vector the policy did not pass: what the file expected and what the policy did, both in
/// the output's JSON shape (a failure is `{"verdict": "failed", "failure", "detail"}`).
#[derive(Debug, Clone, PartialEq)]
pub struct VectorFailure {
    pub name: String,
    pub expected: Value,
    pub got: Value,
}

impl fmt::Display for VectorFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: expected {}, got {}",
            self.name, self.expected, self.got
        )
    }
}

/// A vectors file that cannot be run (as opposed to vectors the policy fails).
#[derive(Debug, thiserror::Error)]
pub enum VectorsError {
    #[error("vectors are not a JSON array of {{name, input, expect}}: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the vectors file has no cases")]
    Empty,
    #[error("vector {name:?}: {reason}")]
    Expectation { name: String, reason: String },
}

#[derive(Deserialize)]
struct Vector {
    name: String,
    input: Value,
    expect: Value,
}

/// `expect` is strict: a misspelt key would otherwise silently make a vector weaker.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    verdict: ExpectedVerdict,
    code: Option<String>,
    request: Option<Value>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum ExpectedVerdict {
    Allow,
    Reject,
}

/// Runs every vector against `policy`, each on a fresh instance. The whole file is checked
/// before anything runs; a vector passes when `expect.verdict` matches, `expect.code` (if
/// given) matches, and `expect.request` (if given) equals the request the policy lets through
/// (its normalised request, or the input's if it did not normalise). A failed evaluation never
/// passes, whatever the policy's `on_error`.
pub fn run_vectors(policy: &Policy, vectors_json: &[u8]) -> Result<VectorReport, VectorsError> {
    let vectors: Vec<Vector> = serde_json::from_slice(vectors_json)?;
    if vectors.is_empty() {
        return Err(VectorsError::Empty);
    }
    let mut cases = Vec::with_capacity(vectors.len());
    for vector in vectors {
        let expect = parse_expect(&vector)?;
        let input = serde_json::to_vec(&vector.input)?;
        cases.push((vector, expect, input));
    }

    let mut report = VectorReport {
        passed: 0,
        failed: Vec::new(),
    };
    for (vector, expect, input) in cases {
        let got = policy.evaluate(&input);
        if passes(&expect, vector.input.get("request"), &got) {
            report.passed += 1;
        } else {
            report.failed.push(VectorFailure {
                name: vector.name,
                expected: vector.expect,
                got: outcome(&got),
            });
        }
    }
    Ok(report)
}

fn parse_expect(vector: &Vector) -> Result<Expect, VectorsError> {
    let invalid = |reason: String| VectorsError::Expectation {
        name: vector.name.clone(),
        reason,
    };
    let expect =
        Expect::deserialize(&vector.expect).map_err(|e| invalid(format!("invalid expect: {e}")))?;
    match expect.verdict {
        ExpectedVerdict::Allow if expect.code.is_some() => {
            return Err(invalid("expects allow with a code".to_owned()));
        }
        ExpectedVerdict::Reject if expect.request.is_some() => {
            return Err(invalid("expects reject with a request".to_owned()));
        }
        _ => {}
    }
    if let Some(code) = &expect.code
        && PolicyCode::from_wire(code).is_none()
    {
        return Err(invalid(format!(
            "expects code {code:?}, which no policy may give"
        )));
    }
    Ok(expect)
}

fn passes(expect: &Expect, input_request: Option<&Value>, got: &Evaluation) -> bool {
    match (expect.verdict, got) {
        (ExpectedVerdict::Allow, Evaluation::Allow) => expect
            .request
            .as_ref()
            .is_none_or(|request| Some(request) == input_request),
        (ExpectedVerdict::Allow, Evaluation::AllowNormalized(normalized)) => expect
            .request
            .as_ref()
            .is_none_or(|request| request == normalized),
        (ExpectedVerdict::Reject, Evaluation::Reject(rejection)) => expect
            .code
            .as_deref()
            .is_none_or(|code| code == rejection.code()),
        _ => false,
    }
}

/// An evaluation in the output's JSON shape, for reports.
fn outcome(evaluation: &Evaluation) -> Value {
    match evaluation {
        Evaluation::Allow => json!({ "verdict": "allow" }),
        Evaluation::AllowNormalized(request) => json!({ "verdict": "allow", "request": request }),
        Evaluation::Reject(rejection) => json!({
            "verdict": "reject",
            "code": rejection.code(),
            "message": rejection.to_string(),
            "details": rejection.details(),
        }),
        Evaluation::Failed(failure) => json!({
            "verdict": "failed",
            "failure": failure.kind.as_str(),
            "detail": failure.detail,
        }),
    }
}
