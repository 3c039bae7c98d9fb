/*
 * Native unit tests of hotpath_policy.h: the parser, the accessors, the input check, the
 * writer and the verdicts, through hp_evaluate(), the same path the module's
 * hotpath_validate takes. Built and run by ../build.sh with the host's clang, with undefined
 * behaviour trapping (-fsanitize=undefined -fsanitize-trap=undefined).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../hotpath_policy.h"

static int failures;

#define CHECK(cond)                                                                            \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            failures++;                                                                        \
            fprintf(stderr, "%s:%d: failed: %s\n", __FILE__, __LINE__, #cond);                 \
        }                                                                                      \
    } while (0)

static const hp_value *parse(const char *json) { return hp_parse(json, strlen(json), 0); }

/* Parses the first len bytes of text from a heap copy of exactly that size, so that a read
 * past the end shows under AddressSanitizer. */
static const hp_value *parse_exactly(const char *text, size_t len, hp_parse_error *error) {
    char *copy = malloc(len ? len : 1);
    if (!copy) abort();
    memcpy(copy, text, len);
    const hp_value *v = hp_parse(copy, len, error);
    free(copy);
    return v;
}

static int output_is(const char *out, hp_size len, const char *want) {
    if (len == strlen(want) && memcmp(out, want, len) == 0) return 1;
    fprintf(stderr, "  got  %.*s\n  want %s\n", (int)len, out, want);
    return 0;
}

static void parses_every_kind_of_value(void) {
    hp_reset();
    const hp_value *v = parse(" {\"a\": [1, -2.5e1, true, false, null, \"x\"], \"b\": {}, \"c\": []} ");
    CHECK(hp_is_object(v) && hp_object_len(v) == 3);
    const hp_value *a = hp_get(v, "a");
    CHECK(hp_array_len(a) == 6);
    CHECK(hp_number(hp_array_at(a, 0)) == 1.0);
    CHECK(hp_number(hp_array_at(a, 1)) == -25.0);
    CHECK(hp_is_true(hp_array_at(a, 2)));
    CHECK(hp_is_bool(hp_array_at(a, 3)) && !hp_is_true(hp_array_at(a, 3)));
    CHECK(hp_is_null(hp_array_at(a, 4)));
    CHECK(hp_str_eq(hp_array_at(a, 5), "x"));
    CHECK(hp_array_at(a, 6) == 0);
    CHECK(hp_is_object(hp_get(v, "b")) && hp_object_len(hp_get(v, "b")) == 0);
    CHECK(hp_is_array(hp_get(v, "c")) && hp_array_len(hp_get(v, "c")) == 0);
    CHECK(hp_str_eq(hp_path(v, "a.5"), "x"));
    CHECK(hp_path(v, "a.9") == 0 && hp_path(v, "b.x") == 0 && hp_path(v, "a.x") == 0);
    CHECK(hp_is_null(parse("null")) && hp_number(parse("0")) == 0.0);
}

static void decodes_every_escape(void) {
    hp_reset();
    hp_size len = 0;
    const char *s = hp_str(parse("\"q\\\"b\\\\s\\/\\b\\f\\n\\r\\t\\u0041\\u00e9\\u20ac\\ud83d\\ude00\\u0000z\""), &len);
    const char want[] = "q\"b\\s/\b\f\n\r\tA\xC3\xA9\xE2\x82\xAC\xF0\x9F\x98\x80\0z";
    CHECK(s && len == sizeof want - 1 && memcmp(s, want, len) == 0);
    CHECK(s && s[len] == 0);
    const hp_value *v = parse("\"h\xC3\xA9llo \xE2\x9C\x93 \\ud83d\\ude00\"");
    CHECK(hp_utf8_chars(v) == 9);
    CHECK(hp_utf8_chars(parse("1")) == 0);
}

static void numbers_are_exact_where_they_can_be(void) {
    hp_reset();
    hp_i64 n = 0;
    CHECK(hp_number(parse("0.1")) == 0.1);
    CHECK(hp_number(parse("123.456")) == 123.456);
    CHECK(hp_number(parse("1e22")) == 1e22);
    CHECK(hp_number(parse("-0.000001")) == -0.000001);
    CHECK(hp_number(parse("9007199254740993")) == 9007199254740992.0);
    CHECK(hp_integer(parse("-9223372036854775808"), &n) && n == (-9223372036854775807LL - 1));
    CHECK(hp_integer(parse("9223372036854775807"), &n) && n == 9223372036854775807LL);
    CHECK(!hp_integer(parse("9223372036854775808"), &n));
    CHECK(!hp_integer(parse("1.0"), &n) && !hp_integer(parse("1e3"), &n));
    CHECK(hp_integer(parse("42"), &n) && n == 42);
    CHECK(hp_number(parse("1e400")) > 1e308);
    CHECK(hp_number(parse("1e-400")) == 0.0);
}

static void refuses_what_is_not_strict_json(void) {
    static const char *const bad[] = {
        "", " ", "{", "[1,]", "{\"a\":1,}", "{\"a\" 1}", "{1:2}", "[1 2]", "01", "1.", ".5",
        "-", "1e", "+1", "tru", "nul", "\"abc", "\"\\x\"", "\"\\u12\"", "\"\\ud83d\"",
        "\"\\ude00\"", "\"\\ud83d\\u0041\"", "\"a\nb\"", "\"\xC0\xAF\"", "\"\xED\xA0\x80\"",
        "\"\xF4\x90\x80\x80\"", "\"\xE2\x82\"", "{} {}", "[]]", "\"\\", "\"\\\"", "[\"a\\",
        "NaN", "{\"a\":}",
    };
    for (unsigned i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        hp_reset();
        hp_parse_error error = {0, 0};
        const hp_value *v = parse_exactly(bad[i], strlen(bad[i]), &error);
        if (v || !error.what) fprintf(stderr, "  accepted %s\n", bad[i]);
        CHECK(!v && error.what);
    }
    /* The parser reads nothing past the length it is given: the same bytes, cut short. */
    hp_reset();
    CHECK(parse_exactly("[1, 2]", 5, 0) == 0);
    CHECK(parse_exactly("\"ab\"", 3, 0) == 0);
    CHECK(parse_exactly("true", 3, 0) == 0);
    CHECK(parse_exactly("\"\\u00e9\"", 7, 0) == 0);
    CHECK(parse_exactly("{\"a\":-1.5e", 10, 0) == 0);
}

static void nesting_is_bounded_not_recursive(void) {
    static char deep[2 * (HP_MAX_DEPTH + 1)];
    hp_reset();
    for (int i = 0; i < HP_MAX_DEPTH; i++) deep[i] = '[', deep[2 * HP_MAX_DEPTH - 1 - i] = ']';
    CHECK(hp_parse(deep, 2 * HP_MAX_DEPTH, 0) != 0);
    for (int i = 0; i <= HP_MAX_DEPTH; i++) deep[i] = '[', deep[2 * HP_MAX_DEPTH + 1 - i] = ']';
    CHECK(hp_parse(deep, 2 * HP_MAX_DEPTH + 2, 0) == 0);
}

static void the_last_of_a_repeated_key_counts(void) {
    hp_reset();
    CHECK(hp_number(hp_get(parse("{\"a\":1,\"a\":2}"), "a")) == 2.0);
    CHECK(hp_str_eq(hp_getn(parse("{\"a\\u0000b\":\"k\"}"), "a\0b", 3), "k"));
    CHECK(hp_get(0, "a") == 0 && hp_str(0, 0) == 0 && hp_array_len(0) == 0);
}

/* --- Through hp_evaluate. -------------------------------------------------------------- */

#define INPUT(request, facts)                                                                  \
    "{\"abiVersion\":1,\"user\":{\"id\":\"alice\"},\"request\":" request ",\"facts\":" facts "}"
#define GROUP                                                                                  \
    "{\"conversation\":{\"id\":\"c1\",\"type\":\"group\",\"isActive\":true,"                   \
    "\"members\":[\"alice\",\"bob\"]},\"senderBlocks\":[\"mallory\"]}"

static const char *evaluate(const char *input, hp_policy_fn policy, hp_size *len) {
    hp_reset();
    return hp_evaluate(input, strlen(input), policy, len);
}

static hp_verdict views(const hp_input *in) {
    hp_size len = 0;
    const char *user = hp_user_id(in, &len);
    if (!user || len != 5 || memcmp(user, "alice", 5) != 0) return hp_reject(HP_FORBIDDEN, "user");
    if (in->conversation) {
        if (!hp_conversation_is(in, "group") || !hp_conversation_is_active(in))
            return hp_reject(HP_FORBIDDEN, "type");
        if (!hp_conversation_has_member(in, "bob") || hp_conversation_has_member(in, "carol"))
            return hp_reject(HP_FORBIDDEN, "members");
        if (hp_array_len(hp_conversation_members(in)) != 2) return hp_reject(HP_FORBIDDEN, "len");
        if (!hp_blocks(in, "mallory") || hp_blocks(in, "bob")) return hp_reject(HP_FORBIDDEN, "blocks");
        const char *id = hp_conversation_id(in, &len);
        if (!id || len != 2) return hp_reject(HP_FORBIDDEN, "id");
        return hp_reject(HP_CONVERSATION_INACTIVE, "seen the conversation");
    }
    if (hp_array_len(hp_sender_blocks(in)) != 0) return hp_reject(HP_FORBIDDEN, "blocks");
    return hp_allow();
}

static void the_input_views_read_the_abi_input(void) {
    hp_size len = 0;
    const char *out = evaluate(INPUT("{\"content\":\"hi\"}", GROUP), views, &len);
    CHECK(output_is(out, len, "{\"verdict\":\"reject\",\"code\":\"CONVERSATION_INACTIVE\",\"message\":\"seen the conversation\"}"));
    out = evaluate(INPUT("\"any value\"", "{\"conversation\":null,\"senderBlocks\":[]}"), views, &len);
    CHECK(output_is(out, len, "{\"verdict\":\"allow\"}"));
    /* facts, senderBlocks and members may be absent, as for the Rust SDK. */
    out = evaluate("{\"abiVersion\":1,\"user\":{\"id\":\"alice\"},\"request\":null}", views, &len);
    CHECK(output_is(out, len, "{\"verdict\":\"allow\"}"));
}

static int called;
static hp_verdict counts_calls(const hp_input *in) {
    (void)in;
    called++;
    return hp_allow();
}

static void input_that_is_not_the_abi_is_an_error_and_the_policy_is_not_called(void) {
    static const char *const bad[] = {
        "{\"abiVersion\":1,\"user\":{\"id\":\"alice\"},\"request\":{}",
        "[]",
        "{\"user\":{\"id\":\"alice\"},\"request\":{}}",
        "{\"abiVersion\":-1,\"user\":{\"id\":\"alice\"},\"request\":{}}",
        "{\"abiVersion\":1,\"user\":{\"id\":7},\"request\":{}}",
        "{\"abiVersion\":1,\"user\":{\"id\":\"alice\"}}",
        INPUT("{}", "{\"conversation\":{\"id\":\"c\",\"type\":\"group\"},\"senderBlocks\":[]}"),
        INPUT("{}", "{\"conversation\":{\"id\":\"c\",\"type\":\"group\",\"isActive\":true,\"members\":[1]}}"),
        INPUT("{}", "{\"conversation\":null,\"senderBlocks\":[\"a\",null]}"),
        INPUT("{}", "[]"),
    };
    for (unsigned i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        hp_size len = 0;
        called = 0;
        const char *out = evaluate(bad[i], counts_calls, &len);
        const char prefix[] = "{\"verdict\":\"error\",\"message\":\"policy input is not ";
        CHECK(len > sizeof prefix && memcmp(out, prefix, sizeof prefix - 1) == 0);
        CHECK(called == 0);
        /* The error output is itself JSON the SDK can read. */
        CHECK(hp_str_eq(hp_get(hp_parse(out, len, 0), "verdict"), "error"));
    }
}

static hp_verdict with_details(const hp_input *in) {
    hp_json *details = hp_object();
    hp_put_int(details, "maxLinks", 3);
    hp_put_int(details, "min", -9223372036854775807LL - 1);
    hp_put_str(details, "text", "tab\t\"q\" \x01 \xFF ok");
    hp_put_bool(details, "yes", 1);
    hp_put_null(details, "none");
    hp_put_value(details, "request", hp_request(in));
    hp_json *inner = hp_object();
    hp_put_int(inner, "n", 0);
    hp_put_object(details, "inner", inner);
    return hp_reject_details(HP_INVALID_SCHEMA, "too many links", details);
}

static void details_are_written_as_json(void) {
    hp_size len = 0;
    const char *out =
        evaluate(INPUT("{\"a\":[1,2.50,{\"k\\n\":\"\\u00e9\"}],\"b\":null}", GROUP), with_details, &len);
    CHECK(output_is(out, len,
                    "{\"verdict\":\"reject\",\"code\":\"INVALID_SCHEMA\",\"message\":\"too many links\","
                    "\"details\":{\"maxLinks\":3,\"min\":-9223372036854775808,"
                    "\"text\":\"tab\\t\\\"q\\\" \\u0001 \xEF\xBF\xBD ok\",\"yes\":true,\"none\":null,"
                    "\"request\":{\"a\":[1,2.50,{\"k\\n\":\"\xC3\xA9\"}],\"b\":null},"
                    "\"inner\":{\"n\":0}}}"));
}

static hp_verdict long_message(const hp_input *in) {
    static char message[3001]; /* NUL-terminated */
    (void)in;
    /* 1,500 two-byte characters: the output keeps 1,000 of them. */
    for (int i = 0; i < 1500; i++) message[2 * i] = (char)0xC3, message[2 * i + 1] = (char)0xA9;
    return hp_reject(HP_FIELD_TOO_LONG, message);
}

static void a_message_is_cut_to_1000_characters(void) {
    hp_size len = 0;
    const char *out = evaluate(INPUT("{}", GROUP), long_message, &len);
    hp_reset();
    const hp_value *v = hp_parse(out, len, 0);
    CHECK(hp_utf8_chars(hp_get(v, "message")) == HP_MAX_MESSAGE_CHARS);
    CHECK(hp_str_eq(hp_get(v, "code"), "FIELD_TOO_LONG"));
}

static hp_verdict huge_details(const hp_input *in) {
    hp_json *details = hp_object();
    hp_put_value(details, "echo", hp_request(in));
    return hp_reject_details(HP_FORBIDDEN, "big", details);
}

static void details_that_would_pass_64_kib_are_dropped(void) {
    static char input[100000];
    int n = snprintf(input, sizeof input, "{\"abiVersion\":1,\"user\":{\"id\":\"a\"},\"request\":\"");
    for (int i = 0; i < 70000; i++) input[n++] = 'x';
    memcpy(input + n, "\"}", 3);
    hp_size len = 0;
    const char *out = evaluate(input, huge_details, &len);
    CHECK(output_is(out, len, "{\"verdict\":\"reject\",\"code\":\"FORBIDDEN\",\"message\":\"big\",\"details\":{}}"));
}

static hp_verdict out_of_table(const hp_input *in) {
    (void)in;
    return hp_reject((hp_code){42}, "no such code");
}

static hp_verdict normalizes(const hp_input *in) {
    hp_json *request = hp_object_copy(hp_request(in), "content");
    hp_put_str(request, "content", "rewritten");
    return hp_allow_normalized(request);
}

static void codes_outside_the_table_are_errors_and_normalising_rewrites(void) {
    hp_size len = 0;
    const char *out = evaluate(INPUT("{}", GROUP), out_of_table, &len);
    CHECK(output_is(out, len, "{\"verdict\":\"error\",\"message\":\"the policy rejected with a code outside the ABI\"}"));
    out = evaluate(INPUT("{\"conversationId\":\"c1\",\"content\":\"old\",\"meta\":{\"content\":1}}", GROUP),
                   normalizes, &len);
    CHECK(output_is(out, len,
                    "{\"verdict\":\"allow\",\"request\":{\"conversationId\":\"c1\","
                    "\"meta\":{\"content\":1},\"content\":\"rewritten\"}}"));
    CHECK(hp_code_status(HP_INVALID_RECIPIENT) == 400 && hp_code_status(HP_NOT_CONVERSATION_MEMBER) == 403 &&
          hp_code_status(HP_CONVERSATION_NOT_FOUND) == 404 && hp_code_status(HP_USER_BLOCKED) == 409);
}

static void text_buffers_build_messages(void) {
    hp_reset();
    hp_buf *b = hp_buf_new();
    hp_buf_str(b, "content has ");
    hp_buf_int(b, -12);
    hp_buf_str(b, " links");
    CHECK(strcmp(hp_buf_cstr(b), "content has -12 links") == 0);
}

int main(void) {
    parses_every_kind_of_value();
    decodes_every_escape();
    numbers_are_exact_where_they_can_be();
    refuses_what_is_not_strict_json();
    nesting_is_bounded_not_recursive();
    the_last_of_a_repeated_key_counts();
    the_input_views_read_the_abi_input();
    input_that_is_not_the_abi_is_an_error_and_the_policy_is_not_called();
    details_are_written_as_json();
    a_message_is_cut_to_1000_characters();
    details_that_would_pass_64_kib_are_dropped();
    codes_outside_the_table_are_errors_and_normalising_rewrites();
    text_buffers_build_messages();
    if (failures) {
        fprintf(stderr, "sdk-c: %d check(s) failed\n", failures);
        return 1;
    }
    printf("sdk-c: all checks passed\n");
    return 0;
}
