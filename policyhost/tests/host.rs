//! The policy host against hand-written modules: well-behaved ones, ones the loader must
//! refuse, and hostile ones that must be contained and classified. Modules are WAT text built
//! by the `wat` crate, so these tests need no WebAssembly toolchain.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hotpath_core::rejection::{PolicyCode, Rejection};
use hotpath_policy_host::{
    ConversationInput, Decision, Evaluation, FailureKind, LoadError, MAX_MEMORY_BYTES, OnError,
    Policy, PolicyEngine, VectorsError, input_json, run_vectors,
};
use serde_json::{Value, json};

/// One engine for the whole binary, as in the gateway (tests run on several threads at once).
fn engine() -> &'static PolicyEngine {
    static ENGINE: OnceLock<PolicyEngine> = OnceLock::new();
    ENGINE.get_or_init(|| PolicyEngine::new().expect("the policy engine starts"))
}

/// Where the fixed outputs of [`returning`] live in the test modules' memory.
const DATA_AT: u64 = 16;
/// Where a second fixed output lives, for modules that choose between two.
const DATA2_AT: u64 = 2048;

/// A module with the ABI's exports: a bump allocator from 4096 that grows memory as needed, and
/// `hotpath_validate(ptr, len)` with `validate` as its body. `extra` adds module fields.
fn module(validate: &str, extra: &str) -> Vec<u8> {
    let wat = format!(
        r#"(module
          (memory (export "memory") 1)
          (global $heap (mut i32) (i32.const 4096))
          (func (export "hotpath_abi_version") (result i32) (i32.const 1))
          (func (export "hotpath_alloc") (param $len i32) (result i32)
            (local $ptr i32)
            (local.set $ptr (global.get $heap))
            (global.set $heap (i32.add (global.get $heap) (local.get $len)))
            (if (i32.gt_u (global.get $heap) (i32.shl (memory.size) (i32.const 16)))
              (then
                (if (i32.eq
                      (memory.grow (i32.add (i32.const 1) (i32.shr_u
                        (i32.sub (global.get $heap) (i32.shl (memory.size) (i32.const 16)))
                        (i32.const 16))))
                      (i32.const -1))
                  (then (return (i32.const 0))))))
            (local.get $ptr))
          (func (export "hotpath_validate") (param $ptr i32) (param $len i32) (result i64)
            {validate})
          {extra})"#
    );
    wat::parse_str(&wat).expect("test WAT parses")
}

/// A data segment holding `bytes` at `at`.
fn data(at: u64, bytes: &[u8]) -> String {
    let escaped: String = bytes.iter().map(|b| format!("\\{b:02x}")).collect();
    format!(r#"(data (i32.const {at}) "{escaped}")"#)
}

/// The packed `(ptr << 32) | len` return value, as a WAT constant.
fn packed(ptr: u64, len: u64) -> String {
    format!("(i64.const {})", (ptr << 32) | len)
}

/// A policy that always answers `output`.
fn returning(output: &[u8]) -> Vec<u8> {
    module(
        &packed(DATA_AT, output.len() as u64),
        &data(DATA_AT, output),
    )
}

fn load(bytes: &[u8]) -> Policy {
    engine()
        .load("test", bytes, OnError::Deny)
        .expect("the module loads")
}

/// A realistic input, built the way the gateway builds it.
fn sample_input() -> Vec<u8> {
    input_json(
        "alice",
        &json!({"conversationId": "3f1c0000-0000-4000-8000-000000000000", "content": "hi"}),
        Some(ConversationInput {
            id: "3f1c0000-0000-4000-8000-000000000000",
            kind: "group",
            is_active: true,
            members: vec!["bob", "alice"],
        }),
        ["mallory"],
    )
}

fn allow_policy() -> Policy {
    load(&returning(br#"{"verdict":"allow"}"#))
}

/// A policy that allows inputs that start with `{` and end with `}`, and rejects anything
/// else: it reads the input, so it checks the host wrote it where `hotpath_alloc` said.
fn braces_policy() -> Policy {
    let allow = br#"{"verdict":"allow"}"#;
    let reject = br#"{"verdict":"reject","code":"INVALID_SCHEMA","message":"not an object"}"#;
    let validate = format!(
        r#"(if (result i64)
             (i32.and
               (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 123))
               (i32.eq (i32.load8_u (i32.sub (i32.add (local.get $ptr) (local.get $len)) (i32.const 1)))
                       (i32.const 125)))
             (then {})
             (else {}))"#,
        packed(DATA_AT, allow.len() as u64),
        packed(DATA2_AT, reject.len() as u64)
    );
    load(&module(
        &validate,
        &format!("{} {}", data(DATA_AT, allow), data(DATA2_AT, reject)),
    ))
}

fn failure_kind(evaluation: &Evaluation) -> Option<FailureKind> {
    match evaluation {
        Evaluation::Failed(failure) => Some(failure.kind),
        _ => None,
    }
}

/// After a hostile module, the engine still serves a good one.
fn assert_engine_still_serves() {
    assert_eq!(allow_policy().evaluate(&sample_input()), Evaluation::Allow);
}

/// Loads `bytes`, evaluates it once, and checks the failure is of `kind`.
fn assert_fails(bytes: &[u8], kind: FailureKind) -> hotpath_policy_host::Failure {
    let evaluation = load(bytes).evaluate(&sample_input());
    match evaluation {
        Evaluation::Failed(failure) => {
            assert_eq!(failure.kind, kind, "{failure}");
            assert_engine_still_serves();
            failure
        }
        other => panic!("expected a {kind} failure, got {other:?}"),
    }
}

// ---- well-behaved policies ----

#[test]
fn a_policy_allows() {
    let policy = allow_policy();
    assert_eq!(policy.name(), "test");
    assert_eq!(policy.on_error(), OnError::Deny);
    assert_eq!(policy.evaluate(&sample_input()), Evaluation::Allow);
}

#[test]
fn a_policy_rejects_with_code_message_and_details() {
    let policy = load(&returning(
        br#"{"verdict":"reject","code":"FIELD_TOO_LONG","message":"content is longer than 10000 characters","details":{"field":"content","maxLength":10000,"actualLength":10001}}"#,
    ));
    let Evaluation::Reject(rejection) = policy.evaluate(&sample_input()) else {
        panic!("expected a rejection");
    };
    assert_eq!(
        rejection,
        Rejection::Policy {
            code: PolicyCode::FieldTooLong,
            message: "content is longer than 10000 characters".into(),
            details: json!({"field": "content", "maxLength": 10000, "actualLength": 10001}),
        }
    );
    assert_eq!(
        (rejection.status(), rejection.code()),
        (400, "FIELD_TOO_LONG")
    );
}

#[test]
fn a_rejection_without_message_or_details_gets_defaults() {
    let policy = load(&returning(
        br#"{"verdict":"reject","code":"USER_BLOCKED","details":null}"#,
    ));
    assert_eq!(
        policy.evaluate(&sample_input()),
        Evaluation::Reject(Rejection::Policy {
            code: PolicyCode::UserBlocked,
            message: "rejected by policy test".into(),
            details: json!({}),
        })
    );
}

#[test]
fn a_policy_normalises_the_request() {
    let policy = load(&returning(
        br#"{"verdict":"allow","request":{"conversationId":"c","content":"hi"},"note":"ignored"}"#,
    ));
    assert_eq!(
        policy.evaluate(&sample_input()),
        Evaluation::AllowNormalized(json!({"conversationId": "c", "content": "hi"}))
    );
}

#[test]
fn the_policy_reads_the_input_the_host_wrote() {
    let policy = braces_policy();
    assert_eq!(policy.evaluate(&sample_input()), Evaluation::Allow);
    assert!(matches!(
        policy.evaluate(b"[1, 2]"),
        Evaluation::Reject(Rejection::Policy {
            code: PolicyCode::InvalidSchema,
            ..
        })
    ));
    // An input spanning several pages makes the allocator grow memory first.
    let big = input_json("alice", &json!({"content": "x".repeat(200_000)}), None, []);
    assert_eq!(policy.evaluate(&big), Evaluation::Allow);
}

#[test]
fn the_input_follows_the_abi() {
    let input: Value = serde_json::from_slice(&input_json(
        "alice",
        &json!({"content": "hi"}),
        Some(ConversationInput {
            id: "c1",
            kind: "group",
            is_active: false,
            members: vec!["carol", "alice", "bob"],
        }),
        ["zed", "mallory"],
    ))
    .expect("the input is JSON");
    assert_eq!(
        input,
        json!({
            "abiVersion": 1,
            "user": {"id": "alice"},
            "request": {"content": "hi"},
            "facts": {
                "conversation": {"id": "c1", "type": "group", "isActive": false,
                                 "members": ["alice", "bob", "carol"]},
                "senderBlocks": ["mallory", "zed"]
            }
        })
    );
    let input: Value = serde_json::from_slice(&input_json("bob", &json!(42), None, []))
        .expect("the input is JSON");
    assert_eq!(
        input["facts"],
        json!({"conversation": null, "senderBlocks": []})
    );
    assert_eq!(input["request"], json!(42));
}

#[test]
fn the_digest_is_the_sha256_of_the_bytes() {
    use sha2::{Digest, Sha256};
    let bytes = returning(br#"{"verdict":"allow"}"#);
    let policy = load(&bytes);
    assert_eq!(policy.digest(), hex::encode(Sha256::digest(&bytes)));
    assert_ne!(
        policy.digest(),
        load(&returning(br#"{"verdict": "allow"}"#)).digest()
    );
}

#[test]
fn policies_evaluate_concurrently() {
    let policy = braces_policy();
    let input = sample_input();
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..250 {
                    assert_eq!(policy.evaluate(&input), Evaluation::Allow);
                }
            });
        }
    });
}

/// The deadline counts the evaluating thread's CPU time, so evaluations preempted on a busy host
/// (here: a spinning thread per core, plus the evaluating threads) are not failed, while a
/// spinning policy is still interrupted in bounded time. A pure wall-clock deadline fails this.
#[test]
fn a_busy_host_does_not_fail_healthy_policies() {
    let policy = braces_policy();
    let spinning = load(&module("(loop $l (br $l)) (unreachable)", ""));
    let input = sample_input();
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let busy_until = Instant::now() + Duration::from_millis(1000);
    std::thread::scope(|scope| {
        for _ in 0..cores {
            scope.spawn(|| {
                while Instant::now() < busy_until {
                    std::hint::spin_loop();
                }
            });
        }
        for _ in 0..2 {
            scope.spawn(|| {
                while Instant::now() < busy_until {
                    assert_eq!(policy.evaluate(&input), Evaluation::Allow);
                }
            });
        }
        scope.spawn(|| {
            let started = Instant::now();
            let evaluation = spinning.evaluate(&input);
            assert_eq!(failure_kind(&evaluation), Some(FailureKind::Deadline));
            assert!(started.elapsed() < Duration::from_secs(1));
        });
    });
}

// ---- refused at load ----

#[test]
fn a_module_with_imports_is_refused_naming_them() {
    let bytes = wat::parse_str(
        r#"(module
          (import "env" "anything" (func))
          (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 1))"#,
    )
    .expect("WAT parses");
    let error = engine()
        .load("imports", &bytes, OnError::Deny)
        .expect_err("imports are refused");
    assert!(matches!(error, LoadError::Imports(_)), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("env.anything"), "{message}");
    assert!(
        message.contains("wasi_snapshot_preview1.fd_write"),
        "{message}"
    );
}

#[test]
fn a_module_without_hotpath_validate_is_refused() {
    let bytes = wat::parse_str(
        r#"(module
          (memory (export "memory") 1)
          (func (export "hotpath_abi_version") (result i32) (i32.const 1))
          (func (export "hotpath_alloc") (param i32) (result i32) (i32.const 16)))"#,
    )
    .expect("WAT parses");
    let error = engine()
        .load("partial", &bytes, OnError::Deny)
        .expect_err("a missing export is refused");
    assert!(
        matches!(error, LoadError::MissingExport("hotpath_validate")),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        "the module does not export `hotpath_validate`"
    );
}

#[test]
fn an_export_of_the_wrong_type_is_refused() {
    let bytes = wat::parse_str(
        r#"(module
          (memory (export "memory") 1)
          (func (export "hotpath_abi_version") (result i32) (i32.const 1))
          (func (export "hotpath_alloc") (param i32) (result i32) (i32.const 16))
          (func (export "hotpath_validate") (param i32 i32) (result i32) (i32.const 0)))"#,
    )
    .expect("WAT parses");
    let error = engine()
        .load("wrong", &bytes, OnError::Deny)
        .expect_err("a wrongly typed export is refused");
    assert_eq!(
        error.to_string(),
        "export `hotpath_validate` must be (i32, i32) -> (i64), found a function (i32, i32) -> (i32)"
    );
}

#[test]
fn a_module_of_another_abi_version_is_refused() {
    let bytes = wat::parse_str(
        r#"(module
          (memory (export "memory") 1)
          (func (export "hotpath_abi_version") (result i32) (i32.const 2))
          (func (export "hotpath_alloc") (param i32) (result i32) (i32.const 16))
          (func (export "hotpath_validate") (param i32 i32) (result i64) (i64.const 0)))"#,
    )
    .expect("WAT parses");
    let error = engine()
        .load("v2", &bytes, OnError::Deny)
        .expect_err("ABI version 2 is refused");
    assert!(
        matches!(error, LoadError::AbiVersion { found: 2 }),
        "{error:?}"
    );
}

#[test]
fn bytes_that_are_not_wasm_are_refused() {
    for bytes in [
        &b"definitely not wasm"[..],
        b"",
        b"\0asm\x01\0\0\0\x01\xff",
        br#"(module)"#,
    ] {
        let error = engine()
            .load("junk", bytes, OnError::Deny)
            .expect_err("junk is refused");
        assert!(matches!(error, LoadError::Compile(_)), "{error:?}");
    }
}

#[test]
fn a_module_whose_start_function_hangs_is_refused_in_bounded_time() {
    let started = Instant::now();
    let error = engine()
        .load(
            "hangs",
            &module(
                "(i64.const 0)",
                "(func $spin (loop $l (br $l))) (start $spin)",
            ),
            OnError::Deny,
        )
        .expect_err("a hanging start is refused");
    assert!(started.elapsed() < Duration::from_secs(1));
    match error {
        LoadError::AbiCall(failure) => assert_eq!(failure.kind, FailureKind::Deadline),
        other => panic!("expected a deadline, got {other:?}"),
    }
}

#[test]
fn a_module_needing_more_than_the_memory_cap_is_refused() {
    let pages = MAX_MEMORY_BYTES / 65536 + 1;
    let bytes = wat::parse_str(format!(
        r#"(module
          (memory (export "memory") {pages})
          (func (export "hotpath_abi_version") (result i32) (i32.const 1))
          (func (export "hotpath_alloc") (param i32) (result i32) (i32.const 16))
          (func (export "hotpath_validate") (param i32 i32) (result i64) (i64.const 0)))"#
    ))
    .expect("WAT parses");
    let error = engine()
        .load("big", &bytes, OnError::Deny)
        .expect_err("an oversized memory is refused");
    // The pool's per-memory limit refuses it at compile time.
    assert!(
        matches!(error, LoadError::Compile(ref detail) if detail.contains("exceeds the limit")),
        "{error:?}"
    );
}

// ---- hostile policies: contained, classified, and the engine carries on ----

#[test]
fn an_infinite_loop_misses_the_deadline() {
    let started = Instant::now();
    let failure = assert_fails(
        &module("(loop $l (br $l)) (unreachable)", ""),
        FailureKind::Deadline,
    );
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    // The wall-clock backstop trips first when other tests starve this thread of CPU.
    assert!(
        ["used its 10 ms of CPU", "still running after 250 ms"].contains(&failure.detail.as_str()),
        "{failure}"
    );

    // The deadline is per evaluation, not per engine: time the evaluation alone.
    let policy = load(&module("(loop $l (br $l)) (unreachable)", ""));
    let started = Instant::now();
    let evaluation = policy.evaluate(&sample_input());
    let elapsed = started.elapsed();
    assert_eq!(failure_kind(&evaluation), Some(FailureKind::Deadline));
    assert!(
        elapsed >= Duration::from_millis(8) && elapsed < Duration::from_millis(500),
        "interrupted after {elapsed:?}"
    );
}

#[test]
fn hitting_the_memory_cap_is_a_failure_even_if_the_policy_then_allows() {
    // Grows until refused, then answers "allow" as if nothing happened: the ABI says hitting the
    // cap is a failure, so the verdict must not count, whatever the module answers after it.
    let allow = br#"{"verdict":"allow"}"#;
    let validate = format!(
        r#"(block $refused
             (loop $grow
               (br_if $refused (i32.eq (memory.grow (i32.const 7)) (i32.const -1)))
               (br $grow)))
           {}"#,
        packed(DATA_AT, allow.len() as u64),
    );
    let bytes = module(&validate, &data(DATA_AT, allow));
    let failure = assert_fails(&bytes, FailureKind::Memory);
    assert!(failure.detail.contains("16 MiB"), "{failure}");

    // Fail-closed by default, with the failure's kind in the details; let through only when
    // the policy is configured `on_error: allow`.
    let deny = engine()
        .load("greedy", &bytes, OnError::Deny)
        .expect("loads");
    let Decision::Reject(rejection) = deny.evaluate(&sample_input()).decide(&deny) else {
        panic!("a memory failure of a deny policy rejects");
    };
    assert_eq!((rejection.status(), rejection.code()), (403, "FORBIDDEN"));
    assert_eq!(rejection.body()["error"]["details"]["failure"], "memory");
    let lenient = engine()
        .load("lenient", &bytes, OnError::Allow)
        .expect("loads");
    assert_eq!(
        lenient.evaluate(&sample_input()).decide(&lenient),
        Decision::Allow
    );
}

#[test]
fn running_out_of_memory_is_a_memory_failure() {
    // An allocator that gives up the way Rust's does: grow until refused, then trap. The
    // refused growth itself ends the evaluation.
    let failure = assert_fails(
        &module(
            r#"(loop $grow
                 (br_if $grow (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
               (unreachable)"#,
            "",
        ),
        FailureKind::Memory,
    );
    assert!(failure.detail.contains("16 MiB"), "{failure}");
}

#[test]
fn growing_memory_forever_is_contained() {
    // Ignores every refusal and would keep asking until the deadline: the first refusal ends it.
    let started = Instant::now();
    assert_fails(
        &module(
            "(loop $l (drop (memory.grow (i32.const 1))) (br $l)) (unreachable)",
            "",
        ),
        FailureKind::Memory,
    );
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn unreachable_is_a_trap() {
    let failure = assert_fails(&module("(unreachable)", ""), FailureKind::Trap);
    assert!(failure.detail.contains("unreachable"), "{failure}");
}

#[test]
fn unbounded_recursion_is_a_trap() {
    assert_fails(
        &module(
            "(call $down (i64.const 0))",
            "(func $down (param i64) (result i64) (call $down (i64.add (local.get 0) (i64.const 1))))",
        ),
        FailureKind::Trap,
    );
}

#[test]
fn an_out_of_bounds_access_is_a_trap() {
    assert_fails(&module("(i64.load (i32.const -8))", ""), FailureKind::Trap);
}

#[test]
fn garbage_output_is_malformed() {
    assert_fails(&returning(b"\xff\xfe\0garbage"), FailureKind::Malformed);
}

#[test]
fn outputs_outside_the_abi_are_malformed() {
    let long_message = format!(
        r#"{{"verdict":"reject","code":"FORBIDDEN","message":"{}"}}"#,
        "é".repeat(1001)
    );
    let cases: [&[u8]; 10] = [
        b"",
        br#"{"verdict":"allow"} trailing"#,
        br#"["allow"]"#,
        br#"{"verdict":"maybe"}"#,
        br#"{"code":"FORBIDDEN"}"#,
        br#"{"verdict":"reject"}"#,
        br#"{"verdict":"reject","code":"FORBIDDEN","details":[1]}"#,
        br#"{"verdict":"reject","code":"FORBIDDEN","message":7}"#,
        br#"{"verdict":"allow","request":"hi"}"#,
        long_message.as_bytes(),
    ];
    for output in cases {
        let evaluation = load(&returning(output)).evaluate(&sample_input());
        assert_eq!(
            failure_kind(&evaluation),
            Some(FailureKind::Malformed),
            "{} gave {evaluation:?}",
            String::from_utf8_lossy(output)
        );
    }
    // Exactly the longest message allowed is fine.
    let longest = format!(
        r#"{{"verdict":"reject","code":"FORBIDDEN","message":"{}"}}"#,
        "é".repeat(1000)
    );
    assert!(matches!(
        load(&returning(longest.as_bytes())).evaluate(&sample_input()),
        Evaluation::Reject(_)
    ));
    assert_engine_still_serves();
}

#[test]
fn a_policy_reporting_an_error_fails_with_its_message() {
    let failure = assert_fails(
        &returning(br#"{"verdict":"error","message":"input is not JSON: expected value"}"#),
        FailureKind::Malformed,
    );
    assert_eq!(
        failure.detail,
        "the policy reported an error: input is not JSON: expected value"
    );
}

#[test]
fn a_code_outside_the_table_is_malformed() {
    let failure = assert_fails(
        &returning(br#"{"verdict":"reject","code":"ENQUEUE_FAILED","message":"x"}"#),
        FailureKind::Malformed,
    );
    assert!(failure.detail.contains("ENQUEUE_FAILED"), "{failure}");
}

#[test]
fn an_out_of_bounds_output_pointer_is_bad_output() {
    assert_fails(
        &module(&packed(0xffff_0000, 10), ""),
        FailureKind::BadOutput,
    );
    // Straddling the end of memory (one 64 KiB page).
    assert_fails(&module(&packed(65_530, 10), ""), FailureKind::BadOutput);
}

#[test]
fn an_oversized_output_is_bad_output() {
    let failure = assert_fails(&module(&packed(0, 100_000), ""), FailureKind::BadOutput);
    assert!(failure.detail.contains("100000"), "{failure}");
    assert_fails(
        &module(&packed(16, u32::MAX as u64), ""),
        FailureKind::BadOutput,
    );
}

#[test]
fn an_allocator_that_fails_or_lies_is_contained() {
    let fixed_alloc = |result: &str| {
        wat::parse_str(format!(
            r#"(module
              (memory (export "memory") 1)
              (func (export "hotpath_abi_version") (result i32) (i32.const 1))
              (func (export "hotpath_alloc") (param i32) (result i32) (i32.const {result}))
              (func (export "hotpath_validate") (param i32 i32) (result i64) (i64.const 0)))"#
        ))
        .expect("WAT parses")
    };
    assert_fails(&fixed_alloc("0"), FailureKind::Memory);
    assert_fails(&fixed_alloc("65500"), FailureKind::BadOutput);
    assert_fails(&fixed_alloc("-16"), FailureKind::BadOutput);
}

// ---- on_error ----

#[test]
fn on_error_decides_what_a_failure_means() {
    let trapping = module("(unreachable)", "");
    let deny = engine()
        .load("strict", &trapping, OnError::Deny)
        .expect("loads");
    let allow = engine()
        .load("lenient", &trapping, OnError::Allow)
        .expect("loads");
    assert_eq!(allow.on_error(), OnError::Allow);

    assert_eq!(
        allow.evaluate(&sample_input()).decide(&allow),
        Decision::Allow
    );

    let Decision::Reject(rejection) = deny.evaluate(&sample_input()).decide(&deny) else {
        panic!("a failure of a deny policy rejects");
    };
    assert_eq!((rejection.status(), rejection.code()), (403, "FORBIDDEN"));
    assert_eq!(
        rejection.body(),
        json!({"error": {
            "code": "FORBIDDEN",
            "message": "policy strict failed",
            "details": {"policy": "strict", "failure": "trap"}
        }})
    );

    // Verdicts pass through untouched whatever on_error says.
    let rejecting = engine()
        .load(
            "rejecting",
            &returning(br#"{"verdict":"reject","code":"USER_BLOCKED","message":"blocked"}"#),
            OnError::Allow,
        )
        .expect("loads");
    assert!(matches!(
        rejecting.evaluate(&sample_input()).decide(&rejecting),
        Decision::Reject(Rejection::Policy {
            code: PolicyCode::UserBlocked,
            ..
        })
    ));
    assert_eq!(
        serde_json::from_str::<OnError>(r#""allow""#).expect("parses"),
        OnError::Allow
    );
    assert_eq!(OnError::default(), OnError::Deny);
}

#[test]
fn a_policy_outliving_its_engine_is_still_interrupted() {
    let engine = PolicyEngine::new().expect("a second engine starts");
    let policy = engine
        .load(
            "orphan",
            &module("(loop $l (br $l)) (unreachable)", ""),
            OnError::Deny,
        )
        .expect("loads");
    drop(engine);
    let started = Instant::now();
    assert_eq!(
        failure_kind(&policy.evaluate(&sample_input())),
        Some(FailureKind::Deadline)
    );
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[test]
fn a_profiled_engine_names_the_modules_functions_for_perf() {
    let engine = PolicyEngine::with_perf_map().expect("a profiled engine starts");
    let named = module(
        &format!("(call $profiled_marker) {}", packed(DATA_AT, 19)),
        &format!(
            "(func $profiled_marker) {}",
            data(DATA_AT, br#"{"verdict":"allow"}"#)
        ),
    );
    let policy = engine
        .load("profiled", &named, OnError::Deny)
        .expect("loads");
    assert!(matches!(
        policy.evaluate(&sample_input()),
        Evaluation::Allow
    ));
    let map = Path::new("/tmp").join(format!("perf-{}.map", std::process::id()));
    let written = std::fs::read_to_string(&map).expect("the perf map is written");
    assert!(
        written.contains("profiled_marker"),
        "{} names the module's functions",
        map.display()
    );
    let _ = std::fs::remove_file(&map);
}

// ---- test vectors ----

fn vector(name: &str, input: &[u8], expect: Value) -> Value {
    let input: Value = serde_json::from_slice(input).unwrap_or_else(|_| json!("not an object"));
    json!({ "name": name, "input": input, "expect": expect })
}

#[test]
fn vectors_that_pass() {
    let policy = braces_policy();
    let vectors = json!([
        vector(
            "accepts an object",
            &sample_input(),
            json!({"verdict": "allow"})
        ),
        vector(
            "the request goes through unchanged",
            &sample_input(),
            json!({"verdict": "allow",
                   "request": {"conversationId": "3f1c0000-0000-4000-8000-000000000000", "content": "hi"}})
        ),
        vector(
            "refuses a string",
            b"\"x\"",
            json!({"verdict": "reject", "code": "INVALID_SCHEMA"})
        ),
        vector("refuses an array", b"[1]", json!({"verdict": "reject"})),
    ]);
    let report = run_vectors(&policy, vectors.to_string().as_bytes()).expect("vectors run");
    assert!(report.ok(), "{:?}", report.failed);
    assert_eq!(report.passed, 4);

    let normalising = load(&returning(
        br#"{"verdict":"allow","request":{"content":"hi"}}"#,
    ));
    let vectors = json!([vector(
        "trims",
        &sample_input(),
        json!({"verdict": "allow", "request": {"content": "hi"}})
    )]);
    let report = run_vectors(&normalising, vectors.to_string().as_bytes()).expect("vectors run");
    assert_eq!((report.passed, report.failed.len()), (1, 0));
}

#[test]
fn vectors_that_fail_say_why() {
    let policy = braces_policy();
    let vectors = json!([
        vector("passes", &sample_input(), json!({"verdict": "allow"})),
        vector(
            "wrong verdict",
            &sample_input(),
            json!({"verdict": "reject"})
        ),
        vector(
            "wrong code",
            b"[1]",
            json!({"verdict": "reject", "code": "FIELD_TOO_LONG"})
        ),
        vector(
            "not normalised",
            &sample_input(),
            json!({"verdict": "allow", "request": {}})
        ),
    ]);
    let report = run_vectors(&policy, vectors.to_string().as_bytes()).expect("vectors run");
    assert_eq!(report.passed, 1);
    let names: Vec<&str> = report.failed.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["wrong verdict", "wrong code", "not normalised"]);
    assert_eq!(report.failed[0].got, json!({"verdict": "allow"}));
    assert_eq!(report.failed[1].got["code"], "INVALID_SCHEMA");
    assert_eq!(
        report.failed[1].expected,
        json!({"verdict": "reject", "code": "FIELD_TOO_LONG"})
    );
    assert!(
        report.failed[1]
            .to_string()
            .starts_with("wrong code: expected")
    );

    // A failing policy never passes a vector, even one that lets failures through.
    let trapping = engine()
        .load("trapping", &module("(unreachable)", ""), OnError::Allow)
        .expect("loads");
    let vectors = json!([vector(
        "allows",
        &sample_input(),
        json!({"verdict": "allow"})
    )]);
    let report = run_vectors(&trapping, vectors.to_string().as_bytes()).expect("vectors run");
    assert_eq!(report.passed, 0);
    assert_eq!(report.failed[0].got["verdict"], "failed");
    assert_eq!(report.failed[0].got["failure"], "trap");
}

#[test]
fn vectors_files_that_cannot_run_are_errors() {
    let policy = allow_policy();
    let run = |vectors: Value| run_vectors(&policy, vectors.to_string().as_bytes());
    assert!(matches!(run(json!([])), Err(VectorsError::Empty)));
    assert!(matches!(
        run(json!({"name": "x"})),
        Err(VectorsError::Json(_))
    ));
    assert!(matches!(
        run_vectors(&policy, b"not json"),
        Err(VectorsError::Json(_))
    ));
    for expect in [
        json!({"verdict": "allow", "cod": "X"}),
        json!({"verdict": "maybe"}),
        json!({"verdict": "reject", "code": "ENQUEUE_FAILED"}),
        json!({"verdict": "allow", "code": "FORBIDDEN"}),
        json!({"verdict": "reject", "request": {}}),
    ] {
        let result = run(json!([vector("v", &sample_input(), expect.clone())]));
        assert!(
            matches!(result, Err(VectorsError::Expectation { ref name, .. }) if name == "v"),
            "{expect} gave {result:?}"
        );
    }
}

// ---- the shipped policies, when built ----

fn dist() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/dist")
}

/// Every module in `policies/dist` with its vectors (`schema` and `authz` are the shipped
/// chain; the others are examples). They are built by `policies/build.sh`, not by this test:
/// a missing one is skipped with a note.
#[test]
fn the_built_policies_pass_their_vectors() {
    let mut names: Vec<String> = std::fs::read_dir(dist())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            name.strip_suffix(".wasm").map(str::to_owned)
        })
        .collect();
    for shipped in ["schema", "authz"] {
        if !names.iter().any(|n| n == shipped) {
            println!(
                "NOTE: {shipped}.wasm is not in {}: run policies/build.sh to test it",
                dist().display()
            );
        }
    }
    names.sort();
    for name in names {
        let module = std::fs::read(dist().join(format!("{name}.wasm"))).expect("readable");
        let Ok(vectors) = std::fs::read(dist().join(format!("{name}.vectors.json"))) else {
            println!("NOTE: {name}.wasm has no vectors file; skipped");
            continue;
        };
        let policy = engine()
            .load(&name, &module, OnError::Deny)
            .unwrap_or_else(|e| panic!("{name}.wasm loads: {e}"));
        let report = run_vectors(&policy, &vectors)
            .unwrap_or_else(|e| panic!("{name}.vectors.json runs: {e}"));
        for failure in &report.failed {
            println!("{name}: {failure}");
        }
        assert!(report.ok(), "{name} failed {} vectors", report.failed.len());
        println!("{name}: {} vectors passed", report.passed);
    }
}

/// A shipped module starts with 2 MiB of memory and grows it only when a message needs more:
/// a request of several MiB (a gateway configured with a large body limit) still gets a
/// verdict, not a memory failure, and the next small one is judged as before.
#[test]
fn a_shipped_policy_grows_its_memory_for_a_large_message() {
    let Ok(module) = std::fs::read(dist().join("schema.wasm")) else {
        panic!(
            "schema.wasm is not in {}: run policies/build.sh",
            dist().display()
        );
    };
    let schema = engine()
        .load("schema", &module, OnError::Deny)
        .expect("schema.wasm loads");
    let request = |blob: usize| {
        json!({"conversationId": "3f1c2a4e-8b1d-4c6f-9e2a-5d7b8c9e0f11",
               "content": "hi", "contentType": "text",
               "metadata": {"blob": "x".repeat(blob)}})
    };
    let large = schema.evaluate(&input_json("alice", &request(3 << 20), None, []));
    assert!(failure_kind(&large).is_none(), "a 3 MiB request: {large:?}");
    let small = schema.evaluate(&input_json("alice", &request(10), None, []));
    assert_eq!(small, Evaluation::Allow);
}

// ---- cost, for information ----

/// Times `runs` evaluations (after a warm-up) and prints the average; asserts nothing about it.
fn time(label: &str, policy: &Policy, input: &[u8], runs: u32) {
    let expected = policy.evaluate(input);
    assert!(failure_kind(&expected).is_none(), "{label}: {expected:?}");
    for _ in 0..100 {
        policy.evaluate(input);
    }
    let started = Instant::now();
    for _ in 0..runs {
        assert_eq!(policy.evaluate(input), expected);
    }
    let elapsed = started.elapsed();
    println!(
        "{label}: {runs} evaluations in {elapsed:?}, {:?} each",
        elapsed / runs
    );
}

#[test]
fn evaluation_cost() {
    time("allow (WAT)", &allow_policy(), &sample_input(), 10_000);
    if let Ok(module) = std::fs::read(dist().join("schema.wasm")) {
        let schema = engine()
            .load("schema", &module, OnError::Deny)
            .expect("schema.wasm loads");
        let input = input_json(
            "alice",
            &json!({"conversationId": "3f1c2a4e-8b1d-4c6f-9e2a-5d7b8c9e0f11",
                    "content": "hi", "contentType": "text"}),
            None,
            [],
        );
        time("schema.wasm", &schema, &input, 2_000);
    }
}
