"""What a sample becomes for a model: text and chats -> token ids and loss spans, frames -> pixels."""
