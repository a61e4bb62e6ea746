"""``tandem generate``: a small client that streams tokens to the terminal; ``tandem
tokenize``: the token ids a prompt becomes on the server."""

from __future__ import annotations

import argparse
import sys

import grpc

from service._proto.tandem.v1 import generation_pb2 as pb
from service._proto.tandem.v1 import generation_pb2_grpc as pb_grpc

FINISH_NAMES = {v: k.removeprefix("FINISH_REASON_").lower() for k, v in pb.FinishReason.items()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text (sent as a user chat message with --chat)")
    parser.add_argument("--address", default="127.0.0.1:50051", help="server host:port")
    parser.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a chat message")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--min-new-tokens", type=int, default=None,
                        help="the output ends at the earliest at the token after this many")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--min-p", type=float, default=None, help="in [0, 1]")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None, help="in (0, 10]")
    parser.add_argument("--frequency-penalty", type=float, default=None, help="in [-2, 2]")
    parser.add_argument("--presence-penalty", type=float, default=None, help="in [-2, 2]")
    parser.add_argument(
        "--logit-bias", action="append", default=[], metavar="ID=BIAS",
        help="add BIAS, in [-100, 100], to token ID's logit (repeatable)",
    )
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--include-stop-str-in-output", action="store_true",
                        help="keep the stop string that ended the output in its text")
    parser.add_argument("--truncate-prompt-tokens", type=int, default=None, metavar="N",
                        help="keep only the prompt's last N tokens")
    parser.add_argument("--priority", type=int, default=None,
                        help="place among waiting requests: lower starts first (default 0)")
    parser.add_argument(
        "--stop-token-id", action="append", type=int, default=[], dest="stop_token_ids",
        help="a token id that ends generation (repeatable)",
    )
    parser.add_argument(
        "--ignore-eos", action="store_true", help="go on past the model's end-of-sequence tokens"
    )
    parser.add_argument(
        "--num-speculative-tokens", type=int, default=None, help="γ (default: adaptive; 0 = off)"
    )
    parser.add_argument(
        "--logprobs", type=int, default=None, metavar="N",
        help="print each token's log-probability under the target, with its N most likely "
        "alternatives (0: none), to stderr",
    )
    parser.add_argument(
        "--prompt-logprobs", type=int, default=None, metavar="N",
        help="print each prompt token's (after the first) log-probability under the target, "
        "with its N most likely alternatives (0: none), to stderr",
    )
    add_connection_arguments(parser)


def add_tokenize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text (a user chat message with --chat)")
    parser.add_argument("--address", default="127.0.0.1:50051", help="server host:port")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a chat message")
    add_connection_arguments(parser)


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=600.0, help="deadline in seconds")
    parser.add_argument("--token", default=None, help="bearer token, if the server wants one")
    parser.add_argument(
        "--ca", default=None, help="CA certificate (PEM) to verify the server with: use TLS"
    )
    parser.add_argument(
        "--cert", default=None,
        help="client certificate (PEM) for mutual TLS (without --ca: the system's CAs)",
    )
    parser.add_argument("--key", default=None, help="client key (PEM), with --cert")


_FIELD_RANGES = {  # what each integer flag's proto field can hold; the server judges the rest
    "max_new_tokens": (0, 2**32 - 1), "min_new_tokens": (0, 2**32 - 1),
    "num_speculative_tokens": (0, 2**32 - 1),
    "seed": (0, 2**64 - 1), "top_k": (-(2**31), 2**31 - 1),
    "prompt_logprobs": (0, 2**32 - 1), "truncate_prompt_tokens": (0, 2**32 - 1),
    "priority": (-(2**31), 2**31 - 1),
}


def build_request(args: argparse.Namespace) -> pb.GenerateStreamRequest:
    """The request the flags describe; a value no request can carry exits with a message
    naming its flag (protobuf raised ValueError, and the user saw a traceback)."""
    if any(token < 0 for token in args.stop_token_ids):
        raise SystemExit("--stop-token-id must be at least 0")
    for name, (least, most) in _FIELD_RANGES.items():
        value = getattr(args, name)
        if value is not None and not least <= value <= most:
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"{flag} must be in [{least}, {most}], got {value}")
    request = pb.GenerateStreamRequest(
        stop=args.stop, stop_token_ids=args.stop_token_ids, ignore_eos=args.ignore_eos,
        include_stop_str_in_output=args.include_stop_str_in_output,
    )
    if args.chat:
        request.messages.add(role="user", content=args.prompt)
    else:
        request.prompt = args.prompt
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty",
                 "frequency_penalty", "presence_penalty"):
        if getattr(args, name) is not None:
            setattr(request.sampling, name, getattr(args, name))
    for entry in args.logit_bias:
        token, _, bias = entry.partition("=")
        try:
            request.sampling.logit_bias[int(token)] = float(bias)
        except (ValueError, OverflowError):  # protobuf: ValueError for ids outside uint32
            raise SystemExit(f"--logit-bias takes ID=BIAS with ID in [0, {2**32 - 1}], "
                             f"got {entry!r}") from None
    if args.max_new_tokens is not None:
        request.max_new_tokens = args.max_new_tokens
    if args.min_new_tokens is not None:
        request.min_new_tokens = args.min_new_tokens
    if args.num_speculative_tokens is not None:
        request.speculation.num_speculative_tokens = args.num_speculative_tokens
    if args.logprobs is not None:
        if args.logprobs < 0:
            raise SystemExit("--logprobs must be at least 0")
        request.logprobs = True
        request.top_logprobs = args.logprobs
    if args.prompt_logprobs is not None:
        request.prompt_logprobs = args.prompt_logprobs
    if args.truncate_prompt_tokens is not None:
        request.truncate_prompt_tokens = args.truncate_prompt_tokens
    if args.priority is not None:
        request.priority = args.priority
    return request


CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1)]
"""gRPC's default 4 MiB limit on a received message is under a long prompt's log-probabilities
(about 230 bytes a token with 20 alternatives): the client reads whatever its server sends."""


def channel_for(args: argparse.Namespace) -> grpc.Channel:
    """Plaintext, or TLS when any of --ca, --cert, --key is given (without --ca: verified
    against the system's CAs); --cert and --key only together."""
    if args.ca is None and args.cert is None and args.key is None:
        return grpc.insecure_channel(args.address, options=CHANNEL_OPTIONS)
    if (args.cert is None) != (args.key is None):
        raise SystemExit("--cert and --key must be given together")

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        try:
            with open(path, "rb") as handle:
                return handle.read()
        except OSError as err:
            raise SystemExit(f"cannot read {path!r}: {err.strerror or err}") from err

    credentials = grpc.ssl_channel_credentials(read(args.ca), read(args.key), read(args.cert))
    return grpc.secure_channel(args.address, credentials, options=CHANNEL_OPTIONS)


def run_tokenize(args: argparse.Namespace) -> int:
    """Print the ids on one line and their count and the context window on stderr."""
    request = pb.TokenizeRequest()
    if args.chat:
        request.messages.add(role="user", content=args.prompt)
    else:
        request.prompt = args.prompt
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    with channel_for(args) as channel:
        try:
            response = pb_grpc.GenerationServiceStub(channel).Tokenize(
                request, timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    print(" ".join(str(token) for token in response.token_ids))
    print(f"[count={response.count} context_window={response.context_window}]", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    request = build_request(args)
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    with channel_for(args) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        try:
            logprobs: list[pb.TokenLogprob] = []
            prompt_logprobs: list[pb.TokenLogprob] = []
            if args.stream:
                usage, finish = pb.Usage(), 0
                stream = stub.GenerateStream(request, timeout=args.timeout, metadata=metadata)
                for message in stream:
                    sys.stdout.write(message.text)
                    sys.stdout.flush()
                    logprobs.extend(message.logprobs)
                    prompt_logprobs.extend(message.prompt_logprobs)
                    if message.HasField("usage"):
                        usage, finish = message.usage, message.finish_reason
                sys.stdout.write("\n")
            else:
                unary = pb.GenerateRequest()
                unary.ParseFromString(request.SerializeToString())  # same fields, same numbers
                response = stub.Generate(unary, timeout=args.timeout, metadata=metadata)
                print(response.text)
                usage, finish = response.usage, response.finish_reason
                logprobs.extend(response.logprobs)
                prompt_logprobs.extend(response.prompt_logprobs)
        except grpc.RpcError as err:
            print(f"error: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    for label, entries in (("prompt_logprob", prompt_logprobs), ("logprob", logprobs)):
        for entry in entries:
            top = " ".join(f"{t.token_id}:{t.logprob:.4f}" for t in entry.top_logprobs)
            print(f"[{label} token={entry.token_id} {entry.logprob:.4f}"
                  + (f" top {top}]" if top else "]"), file=sys.stderr)
    print(
        f"[finish={FINISH_NAMES.get(finish, '?')} prompt_tokens={usage.prompt_tokens} "
        f"completion_tokens={usage.completion_tokens} draft_tokens={usage.draft_tokens} "
        f"accepted={usage.accepted_draft_tokens} acceptance={usage.acceptance_rate:.2f} "
        f"mean_accepted_length={usage.mean_accepted_length:.2f}]",
        file=sys.stderr,
    )
    return 0
