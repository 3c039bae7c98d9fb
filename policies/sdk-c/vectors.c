/*
 * vectors.c: runs a C policy's test vectors natively, exactly as the module would answer them
 * (policies/ABI.md, "Test vectors"): the C SDK's counterpart of the Rust SDK's
 * vectors::check, so a rule's cases run with the host's compiler and its sanitizers before
 * the module is built.
 *
 *     cc -std=c11 -I policies/sdk-c -DHP_POLICY_SOURCE='"my_policy.c"' \
 *         policies/sdk-c/vectors.c -o my-policy-vectors
 *     ./my-policy-vectors vectors.json
 *
 * policies/sdk-c/build.sh SOURCE.c OUT.wasm VECTORS.json does this first. Each case runs on
 * a fresh heap (hp_reset(), like a fresh instance); `expect.verdict` must match, `expect.code`
 * when given must match, `expect.request` when given must equal the normalised request (as
 * JSON values: members in any order). Prints each failure and "N passed, M failed"; exits 0
 * only when every case passed and there was at least one, 2 when the file cannot be read.
 */
#ifndef HP_POLICY_SOURCE
#error "compile with -DHP_POLICY_SOURCE='\"path/to/policy.c\"'"
#endif
#include HP_POLICY_SOURCE

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *name;
    char *input;
    size_t input_len;
    char *verdict;
    char *code;    /* NULL: any */
    char *request; /* NULL: not checked */
    size_t request_len;
} vector_case;

/* A heap copy of `v` written as JSON (the vectors' tree lives in the SDK's arena, which every
 * case resets). */
static char *copy_json(const hp_value *v, size_t *len) {
    hp_buf *b = hp_buf_new();
    if (!b) return NULL;
    hp__json_value(b, v);
    if (b->failed) return NULL;
    char *copy = malloc(b->len + 1);
    if (!copy) return NULL;
    memcpy(copy, b->bytes, b->len);
    copy[b->len] = 0;
    *len = b->len;
    return copy;
}

static char *copy_str(const hp_value *v) {
    hp_size len = 0;
    const char *s = hp_str(v, &len);
    if (!s) return NULL;
    char *copy = malloc(len + 1);
    if (!copy) return NULL;
    memcpy(copy, s, len);
    copy[len] = 0;
    return copy;
}

/* JSON equality: objects as sets of members, numbers by value. */
static int json_equal(const hp_value *a, const hp_value *b) {
    if (!a || !b || a->kind != b->kind) return 0;
    switch (a->kind) {
        case HP_NULL: return 1;
        case HP_BOOL: return a->as.boolean == b->as.boolean;
        case HP_NUMBER: return hp_number(a) == hp_number(b);
        case HP_STRING: return a->len == b->len && memcmp(a->as.text, b->as.text, a->len) == 0;
        case HP_ARRAY:
            if (hp_array_len(a) != hp_array_len(b)) return 0;
            for (hp_size i = 0; i < hp_array_len(a); i++)
                if (!json_equal(hp_array_at(a, i), hp_array_at(b, i))) return 0;
            return 1;
        case HP_OBJECT:
            if (hp_object_len(a) != hp_object_len(b)) return 0;
            for (hp_size i = 0; i < hp_object_len(a); i++) {
                const hp_member *m = hp_object_at(a, i);
                if (!json_equal(&m->value, hp_getn(b, m->key, m->key_len))) return 0;
            }
            return 1;
    }
    return 0;
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *text = malloc(cap);
    for (size_t got; text && (got = fread(text + n, 1, cap - n, f)) > 0;) {
        n += got;
        if (n == cap) text = realloc(text, cap *= 2);
    }
    fclose(f);
    *len = n;
    return text;
}

/* The cases of `text`, copied out of the arena; NULL (with a reason printed) if malformed. */
static vector_case *load(const char *path, const char *text, size_t len, size_t *count) {
    hp_parse_error error = {0, 0};
    const hp_value *root = hp_parse(text, len, &error);
    if (!root) {
        fprintf(stderr, "%s: not JSON: %s at byte %lu\n", path, error.what,
                (unsigned long)error.offset);
        return NULL;
    }
    if (!hp_is_array(root)) {
        fprintf(stderr, "%s: not a list of cases\n", path);
        return NULL;
    }
    *count = hp_array_len(root);
    vector_case *cases = calloc(*count ? *count : 1, sizeof *cases);
    for (hp_size i = 0; cases && i < *count; i++) {
        const hp_value *c = hp_array_at(root, i);
        vector_case *v = &cases[i];
        v->name = copy_str(hp_get(c, "name"));
        const hp_value *input = hp_get(c, "input");
        const hp_value *expect = hp_get(c, "expect");
        v->verdict = copy_str(hp_get(expect, "verdict"));
        if (!v->name || !input || !v->verdict) {
            fprintf(stderr, "%s: case %lu needs a name, an input and expect.verdict\n", path,
                    (unsigned long)i);
            return NULL;
        }
        v->input = copy_json(input, &v->input_len);
        v->code = copy_str(hp_get(expect, "code"));
        const hp_value *request = hp_get(expect, "request");
        v->request = request ? copy_json(request, &v->request_len) : NULL;
        if (!v->input || (request && !v->request)) {
            fprintf(stderr, "%s: case %s is too large to copy\n", path, v->name);
            return NULL;
        }
    }
    return cases;
}

/* Runs one case on a fresh heap; prints why it failed and returns 0, or returns 1. */
static int run(const vector_case *v) {
    hp_reset();
    hp_parse_error error = {0, 0};
    hp_size out_len = 0;
    const char *out = hp_evaluate(v->input, v->input_len, hotpath_policy, &out_len);
    const hp_value *answer = hp_parse(out, out_len, &error);
    const hp_value *verdict = hp_get(answer, "verdict");
    const hp_value *code = hp_get(answer, "code");
    const char *why = NULL;
    if (!hp_str_eq(verdict, v->verdict))
        why = "verdict";
    else if (v->code && !hp_str_eq(code, v->code))
        why = "code";
    else if (v->request) {
        const hp_value *expected = hp_parse(v->request, v->request_len, &error);
        if (!json_equal(hp_get(answer, "request"), expected)) why = "normalised request";
    }
    if (!why) return 1;
    printf("FAIL %s: %s differs: expected verdict %s%s%s, got %.*s\n", v->name, why, v->verdict,
           v->code ? " " : "", v->code ? v->code : "", (int)out_len, out);
    return 0;
}

static void free_cases(vector_case *cases, size_t count) {
    for (size_t i = 0; cases && i < count; i++) {
        free(cases[i].name);
        free(cases[i].input);
        free(cases[i].verdict);
        free(cases[i].code);
        free(cases[i].request);
    }
    free(cases);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s VECTORS.json\n", argv[0]);
        return 2;
    }
    size_t len = 0, count = 0;
    char *text = read_file(argv[1], &len);
    if (!text) {
        fprintf(stderr, "%s: cannot read it\n", argv[1]);
        return 2;
    }
    vector_case *cases = load(argv[1], text, len, &count);
    free(text);
    if (!cases) return 2;
    size_t passed = 0;
    for (size_t i = 0; i < count; i++) passed += (size_t)run(&cases[i]);
    free_cases(cases, count);
    printf("%lu passed, %lu failed\n", (unsigned long)passed, (unsigned long)(count - passed));
    return count > 0 && passed == count ? 0 : 1;
}
