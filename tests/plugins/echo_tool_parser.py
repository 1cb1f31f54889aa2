"""A tool-parser plugin, as a user writes one for `--tool-parser-plugin`: it calls the request's first tool with
the model's whole output as its `text` argument, so a test can see that this file's parser answered."""

import json

from vllm.entrypoints.generate.base.protocol import ExtractedToolCallInformation, FunctionCall, ToolCall
from vllm.tool_parsers.abstract_tool_parser import ToolParser, ToolParserManager


@ToolParserManager.register_module("echo")
class EchoToolParser(ToolParser):
    def extract_tool_calls(self, model_output, request):
        name = request.tools[0].function.name
        call = ToolCall(type="function", function=FunctionCall(name=name, arguments=json.dumps({"text": model_output})))
        return ExtractedToolCallInformation(tools_called=True, tool_calls=[call], content=None)
